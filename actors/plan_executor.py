"""One version's plan: its inference requests, the chunk it has pending and its blended plan.

The control loop keeps two of these on the same ticks: the acting plan (whose targets drive
the arms) and the shadow plan (a candidate's, whose targets are logged beside the executed
action and never commanded). Both follow the same rules, written once here:

- Request: when the worker is idle and the plan runs short (`lookahead` ticks left, or the
  plan is of an older version than the runner), hand the worker a snapshot of this tick.
  Two plans due on one tick share one snapshot (`share`), so both see the same observation.
- Poll: blend in whatever chunk the worker finished, aligned by the tick its observation was
  taken at. A chunk from a runner no longer in use, from before the plan was dropped, or
  too late to cover a single tick is stale and only counted. A failed prediction goes to
  `on_error`, which decides what follows (the acting plan falls back to the last good
  version; the shadow plan stops).
- Lookahead: half the last chunk, at least twice the recent inference latency in ticks, or
  the fixed number given (lockstep cells: `fleet eval` asks at a fixed point of the plan).

The executor never chooses what is commanded: the loop reads this tick's `target` and decides
whether to hold, act or log it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from actors.blending import ChunkBlender, TimedChunk
from actors.inference import Inference, Snapshot
from drivers.interfaces import Observation

if TYPE_CHECKING:
    from fleet.common.policy.runtime import PolicyRunner

ErrorHandler = Callable[["PolicyRunner", str], None]


class PlanExecutor:
    """Requests, polls and blends the chunks of one runner into one plan, tick by tick."""

    def __init__(
        self,
        inference: Inference,
        blender: ChunkBlender,
        period_s: float,
        on_error: ErrorHandler,
        *,
        lookahead: int | None = None,
    ) -> None:
        """`on_error(runner, error)` is called when `runner` fails to predict; `lookahead`
        fixes how many planned ticks are left when the next chunk is asked for."""
        self.inference = inference
        self.blender = blender
        self.period_s = period_s
        self.on_error = on_error
        self.lookahead = lookahead
        self.runner: PolicyRunner | None = None
        self._fresh_from = 0  # results from snapshots before this tick are discarded
        self._chunk_len = 0
        self._latency_ticks = 0.0  # recent inference latency in ticks (EMA)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            (
                "calls",  # inferences asked for
                "errors",  # ... that failed to predict
                "stale",  # chunks that finished too late, or from a runner no longer used
                "blended",  # chunks blended into the plan
                "followup",  # ... of those, ones that continue a running plan
                "ready_in_time",  # ... of those, ready before the plan ran out
            ),
            0,
        )

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def version(self) -> str:
        """The version of the newest chunk in the plan ("" with no plan)."""
        return self.blender.version

    def target(self, tick: int) -> np.ndarray | None:
        """The plan's target for `tick`; past its end its last target; None with no plan."""
        return self.blender.action(tick)

    def remaining(self, tick: int) -> int:
        """Planned ticks left from `tick` on (0 once only holding, or with no plan)."""
        return self.blender.remaining(tick)

    def start(self) -> None:
        self.inference.start()

    def stop(self) -> None:
        self.inference.stop()

    def use(self, runner: PolicyRunner | None) -> None:
        """Ask `runner` for the next chunks; the plan in progress runs on until the new
        version's first chunk is blended into it (a swap is just another crossfade)."""
        self.runner = runner

    def restart(self, runner: PolicyRunner | None, tick: int) -> None:
        """Start over with `runner`: a new plan, nothing kept of the old one's chunk length
        and latency."""
        self.runner = runner
        self.drop_plan(tick)
        self._chunk_len, self._latency_ticks = 0, 0.0

    def drop_plan(self, tick: int) -> None:
        """Forget the plan and any chunk in flight (new episode, operator takeover)."""
        self.blender.reset()
        self._fresh_from = tick
        self.inference.poll()

    def advance(
        self,
        obs: Observation,
        tick: int,
        task: str,
        *,
        hold: Callable[[], np.ndarray] | None = None,
        share: Snapshot | None = None,
    ) -> Snapshot | None:
        """Blend in a finished chunk, request the next one if due, and blend again (an
        inline inference is already done). Returns the snapshot it submitted, if any.
        `hold`: the target the arm holds, to fade a late first chunk in from (acting
        only); `share`: a snapshot of this tick another plan took, reused if due."""
        self._poll(tick, hold)
        if self.runner is None:  # it just failed and nothing replaced it
            return None
        snapshot = self._request_if_due(obs, tick, task, share)
        self._poll(tick, hold)
        return snapshot

    def _request_if_due(
        self, obs: Observation, tick: int, task: str, share: Snapshot | None
    ) -> Snapshot | None:
        runner = self.runner
        assert runner is not None
        if self.inference.busy:
            return None  # a slow worker: the plan runs on (or runs out) meanwhile
        remaining = self.blender.remaining(tick)
        if remaining > self._lookahead() and self.blender.version == runner.version_id:
            return None
        if share is not None and share.tick == tick:
            snapshot = dataclasses.replace(share, runner=runner)
        else:
            snapshot = take_snapshot(obs, task, tick, runner)
        self.inference.submit(snapshot)
        with self._lock:
            self._counts["calls"] += 1
        return snapshot

    def _lookahead(self) -> int:
        if self.lookahead is not None:
            return self.lookahead
        return lookahead_ticks(self._chunk_len, self._latency_ticks)

    def _poll(self, tick: int, hold: Callable[[], np.ndarray] | None) -> None:
        result = self.inference.poll()
        if result is None:
            return
        runner = self.runner
        if result.runner is not runner:
            self._count("stale")  # from a version no longer running
            return
        if result.chunk is None:
            self._count("errors")
            self.on_error(result.runner, result.error)
            return
        chunk = result.chunk
        if chunk.start_tick < self._fresh_from:
            self._count("stale")  # observed before the plan was dropped
            return
        self._chunk_len = len(chunk.actions)
        ticks = chunk.latency_s / self.period_s
        self._latency_ticks = (
            ticks if self._latency_ticks == 0 else (0.8 * self._latency_ticks + 0.2 * ticks)
        )
        had_plan = self.blender.version != ""
        if chunk.end_tick <= tick:  # too late for a single step (nothing to blend)
            self._count("stale")
            return
        if hold is not None and not had_plan and chunk.start_tick < tick:
            # The first chunk of a plan came late while the arm held still: fade it in from
            # the held target instead of jumping to where its plan has got to by now.
            self.blender.reset()
            self.blender.add(TimedChunk(hold()[None], tick), tick)
        in_time = had_plan and self.blender.remaining(tick) > 0
        if not self.blender.add(chunk, tick):
            self._count("stale")
            return
        with self._lock:
            self._counts["blended"] += 1
            self._counts["followup"] += int(had_plan)
            self._counts["ready_in_time"] += int(in_time)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1


def take_snapshot(obs: Observation, task: str, tick: int, runner: PolicyRunner) -> Snapshot:
    """This tick's observation copied out for a worker (the loop moves on at once)."""
    frames = {name: np.array(frame.color) for name, frame in obs.frames.items()}
    joints = np.array(obs.joint_pos, np.float32)
    return Snapshot(frames, joints, task, tick, runner)


def lookahead_ticks(chunk_len: int, latency_ticks: float) -> int:
    """Ask for the next chunk with this many planned ticks left: half a chunk, or twice the
    recent inference latency when that is longer (but less than a whole chunk)."""
    need = int(np.ceil(2.0 * latency_ticks)) + 1
    return max(chunk_len // 2, min(need, max(chunk_len - 1, 0)))

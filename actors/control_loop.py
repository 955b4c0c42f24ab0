"""The cell's fixed-rate control loop: observe, act, command, record, on the cell's clock.

Episodes run back to back. Each tick reads the cell, takes this tick's target from the
blended plan (actors/blending.py), or the operator's action when the operator has taken
over or no policy has arrived yet (those steps are demonstrations, flagged as
interventions), commands the arms and records the step.

The tick never runs the policy: its plan executor (actors/plan_executor.py) hands an
observation snapshot to the inference worker (actors/inference.py) when the plan runs short
and blends in whatever chunk the worker has finished, aligned by the tick its observation
was taken at. With no fresh chunk the loop keeps executing the plan's remaining steps and
then holds its last target, so neither inference latency nor a late chunk stalls the loop.
A new version is adopted as soon as the watcher offers it and takes effect as its first
chunk is crossfaded into the old plan (no jump beyond what the blend window allows; the
safety gate bounds the rest).

The loop never waits on the network: recorded chunks go to the uplink's queue, and new
versions come from the watcher's `take_new()`, which never blocks.

On a real cell the follower arms tick in a servo process of their own
(actors/servo_process.py, fronted by actors/servo_client.ServoProcess): there the loop keeps
no time itself. It takes each tick the servo process ran (joints read, target sent, how late
it started), reads the cameras, decides exactly as above, and sends back the plan from the
next tick on (the blended plan's remaining targets, or the operator's action as a one-tick
plan, held until the next). What it records for a tick is what the servo process read and
sent on it, so a slow moment here delays the plan, never a tick; an operator's action
reaches the arms one tick after the leader arms were read.

Shadow evaluation: while the watcher offers a `shadow_runner` (a candidate in stage
"shadow"), the loop keeps a second plan executor for it, on the same observations and the
same tick stamps: its own inference worker (low CPU priority), its own blender of the acting
kind, and the same "request when the plan runs short" rule; when both are due on one tick
they share the one observation snapshot. The shadow plan runs on through operator takeovers
(those steps are what the shadow is compared with an operator on). Its target for each
recorded step is logged beside the executed action and never commanded. A step the shadow
plan does not cover (the first chunk not back yet, or a shadow slower than its plan) simply
has no shadow action: nothing is held or invented for it, and a chunk goes up with shadow
actions only when every one of its steps has one (`shadow_steps_missing` counts the
others). A shadow that fails to predict is reported once and dropped; the acting version
never notices.
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from prometheus_client import Histogram

from actors.blending import ChunkBlender, CrossfadeBlender
from actors.config import ActorConfig
from actors.inference import Inference, Snapshot, ThreadedInference
from actors.plan_executor import PlanExecutor
from actors.recorder import EpisodeRecorder, RecordingThread
from actors.servo_wire import Plan
from drivers.cell import CellFault
from drivers.interfaces import Clock, DriverFault, Observation, Operator, TaskScene
from fleet.common.metrics import TICK_LATENESS_BUCKETS
from fleet.common.scenes import training_seed
from protos.fleetlearn.v1 import trajectory_pb2

if TYPE_CHECKING:
    from actors.servo_client import ServoProcess
    from drivers.cell import CellHardware
    from fleet.common.policy.runtime import PolicyRunner

log = logging.getLogger(__name__)

FAULT_RETRY_S = 3.0  # between attempts to bring a faulted (not torque-off) cell back

# How late each tick started against its schedule (0 when on time), per cell.
TICK_LATENESS = Histogram(
    "fleet_edge_tick_lateness_seconds",
    "how late each control tick started against its schedule",
    ["cell"],
    buckets=TICK_LATENESS_BUCKETS,
)

RATE_WINDOW_TICKS = 100  # loop_hz is measured over this many recent ticks


@dataclass(frozen=True)
class EpisodeOutcome:
    """How one episode ended: `reward` is the task's dense reward at its last step."""

    episode_id: str
    task: str
    seed: int
    success: bool
    reason: str  # success, failure, timeout, fault or aborted
    steps: int
    intervention_steps: int
    reward: float


class ChunkSink(Protocol):
    def submit(self, chunk: trajectory_pb2.StepChunk) -> bool: ...


class RunnerSource(Protocol):
    def take_new(self) -> PolicyRunner | None: ...


# Per-thread CPU priorities below the loop's own (actors/thread_priority.py): the recorder
# must keep up with the loop; acting inference may lag (the plan covers it), and torch's
# worker threads, started from its thread, inherit its priority; the shadow comes last.
RECORDER_NICE = 2
INFERENCE_NICE = 5
SHADOW_NICE = 10

# `stats` names each plan executor's counts as they have always been named, in this order.
LOOP_COUNTS = (
    "episodes",
    "episodes_aborted",
    "successes",
    "steps_recorded",
    "interventions",
    "late_ticks",
    "chunks_submitted",
)
ACTING_COUNTS = {
    "policy_calls": "calls",
    "policy_errors": "errors",
    "chunks_blended": "blended",  # chunks from inference blended into the plan
    "chunks_followup": "followup",  # ... of those, ones that continue a running plan
    "chunks_ready_in_time": "ready_in_time",  # ... of those, ready before the plan ran out
    "chunks_stale": "stale",  # finished too late to contribute, or from an old version
}
SHADOW_COUNTS = {
    "shadow_calls": "calls",  # inferences asked of the shadow version
    "shadow_errors": "errors",
    "shadow_chunks_stale": "stale",
}


def episode_seed(seed: int, index: int) -> int:
    """A scene seed per episode: reproducible from the actor's seed and the episode index,
    and always a training scene, never one of `fleet eval`'s held-out ones
    (fleet/common/scenes.py)."""
    return training_seed(seed, index)


class ControlLoop:
    """Runs episodes on one cell until stopped; see the module docstring."""

    def __init__(
        self,
        config: ActorConfig,
        hardware: CellHardware,
        scene: TaskScene,
        operator: Operator,
        clock: Clock,
        uplink: ChunkSink,
        watcher: RunnerSource | None,
        *,
        on_fault: Callable[[str], None] | None = None,
        inference: Inference | None = None,
        blender: ChunkBlender | None = None,
        lookahead: int | None = None,
        shadow_inference: Inference | None = None,
    ) -> None:
        """`inference` defaults to a worker thread at lower priority; `blender` to a 4-tick
        crossfade limited to the cell safety gate's max step; `shadow_inference` (the shadow
        version's, used only while the watcher offers a `shadow_runner`) to a worker thread
        at lower priority still;
        `lookahead`: request the next chunk once the plan has this many ticks left (default:
        half the last chunk, at least twice the recent inference latency in ticks)."""
        self.config = config
        self.hardware: Any = hardware
        self.scene = scene
        self.operator = operator
        self.clock = clock
        self.uplink = uplink
        self.watcher = watcher
        self.on_fault = on_fault
        # A real cell's follower arms tick in a servo process: the loop follows its ticks.
        self._servo: ServoProcess | None = (
            hardware if getattr(hardware, "ticks_itself", False) else None  # type: ignore[assignment]
        )
        self.tasks: tuple[str, ...] = config.tasks or tuple(scene.tasks)
        if not self.tasks:
            raise ValueError(f"cell {config.cell_id}: no tasks to run (config and scene empty)")
        self.period = config.period_s
        # Episode ids must never repeat across actor restarts: the learner stores each
        # (cell, episode, seq) once, so a reused id would silently lose the new data.
        self._run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
        self._lock = threading.Lock()
        self._fallback: PolicyRunner | None = None  # the last good runner before the current
        gate = getattr(hardware, "gate", None)
        blender = blender or CrossfadeBlender(max_step=getattr(gate, "max_step", None))
        self.acting = PlanExecutor(
            inference or ThreadedInference(config.cell_id, nice=INFERENCE_NICE),
            blender,
            self.period,
            self._acting_failed,
            lookahead=lookahead,
        )
        # Shadow evaluation: a second plan, blended like the acting one, never executed.
        shadow_blender = copy.deepcopy(blender)
        shadow_blender.reset()
        self.shadow = PlanExecutor(
            shadow_inference
            or ThreadedInference(config.cell_id, name="shadow-inference", nice=SHADOW_NICE),
            shadow_blender,
            self.period,
            self._shadow_failed_to_predict,
            lookahead=lookahead,
        )
        self._shadow_failed: PolicyRunner | None = None  # failed to predict: not used again
        self.fault_retry_s = FAULT_RETRY_S
        self._tick_snapshot: Snapshot | None = None  # the acting snapshot taken this tick
        self._tick = 0  # ticks since the loop started, across episodes
        self._last_target: np.ndarray | None = None
        self._forced: bool | None = None
        self._episode_index = 0
        self._episode_id = ""
        self._task = ""
        self._tick_starts: deque[float] = deque(maxlen=RATE_WINDOW_TICKS)
        self._counts = dict.fromkeys(
            (
                *LOOP_COUNTS,
                "plan_exhausted_ticks",  # policy ticks holding the last target
                "shadow_steps",  # recorded steps with a shadow action
                "shadow_steps_missing",  # steps a shadow ran for but its plan did not cover
            ),
            0,
        )
        self._adoptions: list[dict[str, Any]] = []
        self.last_fault = ""

    # -- public ------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        acting, shadow = self.acting.counts, self.shadow.counts
        with self._lock:
            counts = self._counts
            out: dict[str, Any] = {
                **{k: counts[k] for k in LOOP_COUNTS},
                **{name: acting[k] for name, k in ACTING_COUNTS.items()},
                "plan_exhausted_ticks": counts["plan_exhausted_ticks"],
                **{name: shadow[k] for name, k in SHADOW_COUNTS.items()},
                "shadow_steps": counts["shadow_steps"],
                "shadow_steps_missing": counts["shadow_steps_missing"],
            }
            out["loop_hz"] = self._loop_hz()
            out["version_running"] = self._version
            runner = self.shadow.runner
            out["shadow_version"] = runner.version_id if runner else ""
            out["versions_adopted"] = [dict(a) for a in self._adoptions]
            out["task"] = self._task
            out["episode_id"] = self._episode_id
            out["last_fault"] = self.last_fault
        out["inference"] = self.acting.inference.stats
        out["shadow_inference"] = self.shadow.inference.stats
        return out

    def run(self, stop: threading.Event) -> None:
        """Episodes back to back until `stop` is set; the episode in progress then ends as
        "aborted" so every recorded step still goes to the uplink."""
        log.info(
            "cell %s: control loop at %.1f Hz, tasks %s, %d-step chunks",
            self.config.cell_id,
            self.config.control_hz,
            ",".join(self.tasks),
            self.config.chunk_steps,
        )
        self.acting.start()
        self.shadow.start()
        try:
            while not stop.is_set():
                self._run_episode(stop)
                if self._cell_fault() is not None:
                    self._wait_out_fault(stop)
        finally:
            self.acting.stop()
            self.shadow.stop()

    def _wait_out_fault(self, stop: threading.Event) -> None:
        """After a fault: with torque off, stay idle until restarted (a person must look);
        after a communication fault, retry holding every few seconds and carry on once the
        arms answer again."""
        hw: Any = self.hardware
        while not stop.is_set() and (fault := self._cell_fault()) is not None:
            if stop.wait(self.fault_retry_s):
                return
            if fault.torque_off:
                continue
            try:
                hw.enable()
                hw.hold()
                log.info("cell %s: arms answer again, resuming episodes", self.config.cell_id)
            except CellFault as exc:
                log.warning("cell %s: still faulted: %s", self.config.cell_id, exc)

    def _make_safe(self, exc: DriverFault) -> CellFault:
        make_safe = getattr(self.hardware, "make_safe", None)
        if make_safe is not None:
            return make_safe(exc, "reading the operator")  # type: ignore[no-any-return]
        return CellFault(str(exc), torque_off=exc.torque_off)

    def _cell_fault(self) -> CellFault | None:
        """The fault the cell was made safe from (drivers/cell.CellHardware), if any."""
        fault = getattr(self.hardware, "current_fault", None)
        return fault if isinstance(fault, CellFault) else None

    # -- episodes ------------------------------------------------------------------------

    def _run_episode(self, stop: threading.Event) -> None:
        index = self._episode_index
        self._episode_index += 1
        task = self.tasks[index % len(self.tasks)]
        self.run_episode(task, episode_seed(self.config.seed, index), stop, index=index)

    def run_episode(
        self,
        task: str,
        seed: int,
        stop: threading.Event,
        *,
        index: int | None = None,
        max_episode_s: float | None = None,
    ) -> EpisodeOutcome:
        """One episode of `task` on the scene of `seed`, ended by success, failure, the time
        limit (`max_episode_s`, default the config's), a fault or `stop`. `run` calls this
        for its round robin; `fleet eval` (actors/evaluate.py) calls it with held-out seeds
        and each task's own limit."""
        cfg = self.config
        if index is None:
            index = self._episode_index
            self._episode_index += 1
        limit_s = cfg.max_episode_s if max_episode_s is None else float(max_episode_s)
        episode_id = f"{self._run_id}-{index:06d}"
        with self._lock:
            self._task = task
            self._episode_id = episode_id
        self._take_new_runner()
        self.acting.drop_plan(self._tick)  # a new scene: nothing planned carries over
        self.shadow.drop_plan(self._tick)
        self._last_target = None  # the reset may have moved the arms: hold where they are
        self.scene.reset(task, seed)
        recorder = RecordingThread(
            EpisodeRecorder(cfg.cell_id, episode_id, task, cfg.chunk_steps, cfg.jpeg_quality),
            self._submit,
            on_step=self._count_step,
            nice=RECORDER_NICE,
        )
        started = self.clock.now()
        log.info(
            "cell %s episode %s: %s starts (version %r)",
            cfg.cell_id,
            episode_id,
            task,
            self._version,
        )
        success, reason = False, "aborted"
        steps, interventions, reward = 0, 0, 0.0
        # A real cell's operator may judge the episode a failure (drivers/operator_console).
        failed = getattr(self.scene, "failed", None)
        lateness = TICK_LATENESS.labels(cell=self.config.cell_id)
        pending: tuple[Any, ...] | None = None  # the last tick's step, recorded next tick
        servo = self._servo
        if servo is not None:
            servo.skip_to_now()  # the episode starts with the servo process's next tick
        try:
            # The schedule is anchor + ticks * period, never a running sum: summed periods
            # drift off the sim's substep grid by more the older the cell's clock, and an
            # episode must not depend on how long its cell has run (drivers/sim/world.py).
            anchor, ticks = started, 0
            while not stop.is_set():
                if servo is None:
                    now = self.clock.now()
                    due = anchor + ticks * self.period
                    if self._tick_started(now, now - due, lateness, due) != due:
                        anchor, ticks = now, 0  # a missed tick: the schedule starts again
                try:
                    if servo is None:
                        obs = self.hardware.observe()
                        action, intervention, version = self._act(obs)
                        sent = self.hardware.command(action)
                    else:
                        obs, sent, intervention, version = self._follow(servo, lateness)
                    self._last_target = np.asarray(sent, np.float32)
                    shadow = self._shadow_act(obs)  # logged beside `sent`, never commanded
                except (CellFault, DriverFault) as exc:
                    # The cell already made itself safe (hold or torque off); a fault of a
                    # part outside its guard (the leader arms the operator reads) is made
                    # safe here the same way. The actor reports, ends the episode, stays up.
                    fault = exc if isinstance(exc, CellFault) else self._make_safe(exc)
                    reason = "fault"
                    self._fault(f"cell fault: {fault}")
                    break
                if pending is not None:
                    # The last tick's step goes to the recorder's thread (which encodes its
                    # frames) now that this tick's command is out; the tick only queues it.
                    self._record(recorder, *pending)
                    pending = None
                if servo is None:
                    self._tick += 1
                    ticks += 1
                    self.clock.sleep_until(anchor + ticks * self.period)
                # The step's reward is the one its action earned (read after the physics or
                # the real arms moved), so the success step itself carries the success reward.
                success = bool(self.scene.success())
                reward = float(self.scene.reward())
                steps += 1
                interventions += int(intervention)
                pending = (obs, sent, intervention, reward, version, shadow)
                if success:
                    reason = "success"
                    break
                if failed is not None and failed():
                    reason = "failure"
                    break
                if self.clock.now() - started >= limit_s - 1e-9:
                    reason = "timeout"
                    break
        finally:
            if servo is not None:
                servo.hold_last()  # the plan in flight must not run on past its episode
            success = success and reason == "success"
            ended = self.clock.now()
            try:
                if pending is not None:
                    self._record(recorder, *pending)
            finally:  # the recorder's thread ends with the episode, whatever happened
                recorded = recorder.finish(
                    success=success, reason=reason, started_at=started, ended_at=ended
                )
            if recorded:
                with self._lock:
                    # "episodes" counts finished ones; the one cut short by a stop is apart.
                    key = "episodes_aborted" if reason in ("aborted", "fault") else "episodes"
                    self._counts[key] += 1
                    self._counts["successes"] += int(success)
                log.info(
                    "cell %s episode %s: %s ended %s after %d steps (%.2f s, version %r)",
                    cfg.cell_id,
                    episode_id,
                    task,
                    reason,
                    recorded,
                    ended - started,
                    self._version,
                )
        return EpisodeOutcome(episode_id, task, seed, success, reason, steps, interventions, reward)

    def _tick_started(self, now: float, late: float, lateness: Any, next_tick: float) -> float:
        """Count a tick that started `late` s after its schedule; returns the schedule
        (moved to `now` after a missed tick: never burst to catch up)."""
        lateness.observe(max(0.0, late))
        with self._lock:
            self._tick_starts.append(now)
            if late > self.period:
                self._counts["late_ticks"] += 1
                return now
        return next_tick

    def _follow(
        self, servo: ServoProcess, lateness: Any
    ) -> tuple[Observation, np.ndarray, bool, str]:
        """One tick the servo process ran (actors/servo_process.py): what it read and sent,
        where that came from, and the plan it follows from the next tick on, sent back.

        The target chosen from this tick's observation can only act from the next tick on
        (the servo process has already commanded this one), so the plan sent starts there;
        an operator's action is a one-tick plan the servo process holds until the next."""
        step = servo.next_step()
        self._tick = step.tick
        self._tick_started(step.stamp, step.lateness, lateness, 0.0)
        obs = Observation(joint_pos=step.joints, frames=servo.frames(), stamp=step.stamp)
        self._last_target = step.sent
        action, intervention, version = self._act(obs)
        ahead = self._tick + 1
        if intervention or self.acting.target(ahead) is None:
            targets = np.asarray(action, np.float32)[None]
        else:
            n = max(1, self.acting.remaining(ahead))
            targets = np.stack([self.acting.target(ahead + i) for i in range(n)])  # type: ignore[misc]
        servo.send_plan(Plan(ahead, targets, intervention, version))
        return obs, step.sent, step.intervention, step.version

    def _record(
        self,
        recorder: RecordingThread,
        obs: Observation,
        sent: np.ndarray,
        intervention: bool,
        reward: float,
        version: str,
        shadow: tuple[np.ndarray, str] | None = None,
    ) -> None:
        """Queue one step for the recorder's thread (encoding never runs on the tick)."""
        recorder.add_step(
            stamp=obs.stamp,
            joint_pos=obs.joint_pos,
            action=sent,
            intervention=intervention,
            reward=reward,
            frames=obs.frames,
            policy_version=version,
            shadow_action=shadow[0] if shadow is not None else None,
            shadow_version=shadow[1] if shadow is not None else "",
        )

    def _count_step(self, intervention: bool, has_shadow: bool) -> None:
        """A step is in its episode's recording (runs on the recorder's thread)."""
        with self._lock:
            self._counts["steps_recorded"] += 1
            self._counts["interventions"] += int(intervention)
            self._counts["shadow_steps"] += int(has_shadow)

    def _submit(self, chunk: trajectory_pb2.StepChunk) -> None:
        self.uplink.submit(chunk)  # never blocks; a full queue is counted by the uplink
        with self._lock:
            self._counts["chunks_submitted"] += 1

    # -- acting ----------------------------------------------------------------------------

    @property
    def _version(self) -> str:
        runner = self.acting.runner
        return runner.version_id if runner is not None else ""

    def _hold_target(self, obs: Observation) -> np.ndarray:
        if self._last_target is not None:
            return self._last_target.copy()
        return np.asarray(obs.joint_pos, np.float32).copy()

    def _act(self, obs: Observation) -> tuple[np.ndarray, bool, str]:
        """This tick's 14 joint targets, whether the operator drove them, and the version
        whose plan they come from. Never runs the policy itself."""
        self._tick_snapshot = None
        self._take_new_runner()
        if self.acting.runner is None or self.operator.wants_control():
            self.acting.drop_plan(self._tick)  # a takeover abandons the plan in progress
            return np.asarray(self.operator.action(), dtype=np.float32), True, self._version
        self._tick_snapshot = self.acting.advance(
            obs, self._tick, self._task, hold=lambda: self._hold_target(obs)
        )
        if self.acting.runner is None:  # the running version failed and there is no fallback
            return np.asarray(self.operator.action(), dtype=np.float32), True, ""
        action = self.acting.target(self._tick)
        if action is None:  # the first chunk of this plan is not ready: stay put
            return self._hold_target(obs), False, self._version
        if self.acting.remaining(self._tick) == 0:
            with self._lock:
                self._counts["plan_exhausted_ticks"] += 1
        return action, False, self.acting.version

    def _acting_failed(self, runner: PolicyRunner, error: str) -> None:
        """The acting version failed to predict: fall back to the last good one, if any."""
        fallback = self._fallback
        self._fault(
            f"episode {self._episode_id}: version {runner.version_id} failed to predict "
            f"({error}); falling back to version "
            f"{fallback.version_id if fallback else None!r}"
        )
        with self._lock:
            self.acting.use(fallback)
            self._fallback = None
        self._sync_operator()

    # -- shadow evaluation ------------------------------------------------------------

    def _shadow_act(self, obs: Observation) -> tuple[np.ndarray, str] | None:
        """The shadow version's target for this tick and its version id, or None (no
        shadow, or its plan does not cover this tick). Never raises: a shadow problem must
        not end an episode."""
        try:
            runner = self._current_shadow()
            if runner is None:
                return None
            self.shadow.advance(obs, self._tick, self._task, share=self._tick_snapshot)
            if self.shadow.runner is None:  # it just failed
                return None
            if self.shadow.remaining(self._tick) == 0:
                with self._lock:
                    self._counts["shadow_steps_missing"] += 1
                return None
            target = self.shadow.target(self._tick)
            if target is None:
                return None
            return np.asarray(target, np.float32), runner.version_id
        except Exception:
            log.exception(
                "cell %s episode %s: shadow evaluation failed at tick %d",
                self.config.cell_id,
                self._episode_id,
                self._tick,
            )
            return None

    def _current_shadow(self) -> PolicyRunner | None:
        """The watcher's shadow runner; a change (new, dropped) restarts the shadow plan."""
        offered = getattr(self.watcher, "shadow_runner", None) if self.watcher else None
        if offered is not None and offered is self._shadow_failed:
            offered = None
        previous = self.shadow.runner
        if offered is not previous:
            self.shadow.restart(offered, self._tick)
            log.info(
                "cell %s episode %s: shadow version %r (was %r); its actions are logged, "
                "never executed",
                self.config.cell_id,
                self._episode_id,
                offered.version_id if offered is not None else "",
                previous.version_id if previous is not None else "",
            )
        return self.shadow.runner

    def _shadow_failed_to_predict(self, runner: PolicyRunner, error: str) -> None:
        """A shadow that fails is dropped and never used again; acting never notices."""
        self._shadow_failed = runner
        self.shadow.restart(None, self._tick)
        self._fault(
            f"episode {self._episode_id}: shadow version {runner.version_id} failed to "
            f"predict ({error}); shadow run stopped, acting version "
            f"{self._version!r} unaffected"
        )

    def _take_new_runner(self) -> None:
        if self.watcher is None:
            self._sync_operator()
            return
        runner = self.watcher.take_new()
        if runner is not None:
            previous = self._version
            adoption = {"version": runner.version_id, "adopted_at": time.time()}
            with self._lock:
                if self.acting.runner is not None:
                    self._fallback = self.acting.runner
                self.acting.use(runner)
                self._adoptions.append(adoption)
            log.info(
                "cell %s episode %s: adopted version %s (was %r); it blends in with its "
                "first chunk",
                self.config.cell_id,
                self._episode_id,
                runner.version_id,
                previous,
            )
        self._sync_operator()

    def _sync_operator(self) -> None:
        """While no policy runs, the operator drives every tick (demonstrations)."""
        want = self.acting.runner is None
        if want == self._forced:
            return
        force = getattr(self.operator, "force", None)
        if callable(force):
            force(want)
        self._forced = want

    def _fault(self, message: str) -> None:
        log.error("cell %s: %s", self.config.cell_id, message)
        self.last_fault = message
        if self.on_fault is not None:
            self.on_fault(message)

    def _loop_hz(self) -> float:
        """Ticks per clock second over the recent window (caller holds the lock)."""
        if len(self._tick_starts) < 2:
            return 0.0
        span = self._tick_starts[-1] - self._tick_starts[0]
        return (len(self._tick_starts) - 1) / span if span > 0 else 0.0

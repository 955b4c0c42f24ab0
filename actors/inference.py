"""Edge inference beside the control loop, never in it.

The loop hands over an observation snapshot (frames, joint positions, task, the tick it was
taken at and the runner to use) with `submit`, which never blocks: a snapshot not yet picked
up is replaced by the newer one (newest wins). A worker thread runs `PolicyRunner.predict`
and publishes the result, stamped with the snapshot's tick, for the loop to `poll` (never
blocks either). So inference latency only delays when a new chunk gets blended in; the loop
keeps its rate and executes the current plan meanwhile.

`InlineInference` has the same interface but predicts inside `submit`: for virtual-clock
tests that need a deterministic result on the same tick. Actors run `ThreadedInference`.

A shadow version (evaluated beside the acting one, never executed) gets a worker of its own
with a positive `nice`: on a busy cell computer the acting version's inference and the loop
get the cores first, and a slow shadow only leaves its own steps without a shadow action.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from actors.blending import TimedChunk
from actors.thread_priority import lower_this_thread
from protos.joint_layout import JOINT_DIM

if TYPE_CHECKING:
    from fleet.common.policy.runtime import PolicyRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """What one inference needs, copied out of the loop so the loop can move on."""

    frames: Mapping[str, np.ndarray]
    joint_pos: np.ndarray
    task: str
    tick: int
    runner: PolicyRunner


@dataclass(frozen=True)
class InferenceResult:
    """A chunk, or the error the runner raised; `runner` says which version produced it."""

    runner: PolicyRunner
    chunk: TimedChunk | None
    error: str = ""


class Inference(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def submit(self, snapshot: Snapshot) -> None: ...
    def poll(self) -> InferenceResult | None: ...
    @property
    def busy(self) -> bool: ...
    @property
    def stats(self) -> dict[str, Any]: ...


def run_predict(snapshot: Snapshot) -> InferenceResult:
    """Predict and check the shape and values; an exception becomes an error result."""
    runner = snapshot.runner
    t0 = time.monotonic()
    try:
        chunk = np.asarray(
            runner.predict(snapshot.frames, snapshot.joint_pos, snapshot.task), np.float32
        )
        if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] != JOINT_DIM:
            raise ValueError(f"policy returned shape {chunk.shape}, expected (K, {JOINT_DIM})")
        if not np.all(np.isfinite(chunk)):
            raise ValueError("policy returned non-finite targets")
    except Exception as exc:  # a broken version must never take the actor down
        return InferenceResult(runner, None, str(exc) or type(exc).__name__)
    latency = time.monotonic() - t0
    return InferenceResult(runner, TimedChunk(chunk, snapshot.tick, runner.version_id, latency))


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = {"submitted": 0, "superseded": 0, "completed": 0, "errors": 0}
        self.latencies: list[float] = []

    def done(self, result: InferenceResult) -> None:
        with self.lock:
            if result.chunk is None:
                self.counts["errors"] += 1
            else:
                self.counts["completed"] += 1
                self.latencies.append(result.chunk.latency_s)
                del self.latencies[:-1000]

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = dict(self.counts)
            lat = np.asarray(self.latencies)
        out["latency_p50_s"] = float(np.percentile(lat, 50)) if lat.size else 0.0
        out["latency_p99_s"] = float(np.percentile(lat, 99)) if lat.size else 0.0
        return out


class ThreadedInference:
    """One daemon worker thread; one snapshot slot and one result slot, newest wins."""

    def __init__(self, cell_id: str = "", *, name: str = "inference", nice: int = 0) -> None:
        """`nice` > 0 lowers the worker thread's CPU priority (Linux, per thread)."""
        self.cell_id = cell_id
        self.name = name
        self.nice = int(nice)
        self._cond = threading.Condition()
        self._pending: Snapshot | None = None
        self._result: InferenceResult | None = None
        self._running = False  # a snapshot is being predicted right now
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counters = _Counters()

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._work, name=f"{self.name}-{self.cell_id}", daemon=True
            )
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._pending = None
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=10.0)

    def submit(self, snapshot: Snapshot) -> None:
        with self._cond:
            superseded = self._pending is not None
            self._pending = snapshot
            self._cond.notify()
        with self._counters.lock:
            self._counters.counts["submitted"] += 1
            self._counters.counts["superseded"] += int(superseded)

    def poll(self) -> InferenceResult | None:
        with self._cond:
            result, self._result = self._result, None
        return result

    @property
    def busy(self) -> bool:
        """A snapshot waits or is being predicted: a new one would only replace it."""
        with self._cond:
            return self._running or self._pending is not None

    @property
    def stats(self) -> dict[str, Any]:
        return self._counters.snapshot()

    def _work(self) -> None:
        lower_this_thread(self.nice, cell_id=self.cell_id, what=self.name)
        while True:
            with self._cond:
                while self._pending is None and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                snapshot, self._pending = self._pending, None
                self._running = True
            assert snapshot is not None
            result = run_predict(snapshot)
            if result.error:
                log.warning(
                    "cell %s: version %s failed to predict at tick %d: %s",
                    self.cell_id,
                    snapshot.runner.version_id,
                    snapshot.tick,
                    result.error,
                )
            self._counters.done(result)
            with self._cond:
                self._result = result  # an unpolled older result is superseded
                self._running = False


class InlineInference:
    """Predicts inside `submit` (deterministic; for virtual-clock tests only)."""

    def __init__(self) -> None:
        self._result: InferenceResult | None = None
        self._counters = _Counters()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self._result = None

    def submit(self, snapshot: Snapshot) -> None:
        with self._counters.lock:
            self._counters.counts["submitted"] += 1
        self._result = run_predict(snapshot)
        self._counters.done(self._result)

    def poll(self) -> InferenceResult | None:
        result, self._result = self._result, None
        return result

    @property
    def busy(self) -> bool:
        return False

    @property
    def stats(self) -> dict[str, Any]:
        return self._counters.snapshot()

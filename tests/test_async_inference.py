"""Edge inference beside the control loop: a slow policy never stalls the loop, chunks are
blended without jumps (also across a version swap), and the real sim cell with a real tiny
policy keeps its 20 Hz. The blending math is checked on its own first."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from actors.blending import CrossfadeBlender, TemporalEnsembler, TimedChunk
from actors.config import ActorConfig
from actors.control_loop import ControlLoop
from actors.inference import Snapshot, ThreadedInference
from drivers.interfaces import Frame, Observation

HZ = 20.0
PERIOD = 1.0 / HZ


def chunk(values: list[float], start: int, version: str = "v1") -> TimedChunk:
    return TimedChunk(np.repeat(np.asarray(values, np.float32)[:, None], 14, 1), start, version)


# -- blending math ----------------------------------------------------------------------


def test_crossfade_aligns_a_late_chunk_by_its_start_tick() -> None:
    blender = CrossfadeBlender(window=0)
    assert blender.action(0) is None and blender.remaining(0) == 0
    assert blender.add(chunk([0, 1, 2, 3, 4, 5], start=10), now_tick=13)
    # Observed at tick 10, ready at 13: its first three targets are already past.
    assert [blender.action(t)[0] for t in (13, 14, 15)] == [3, 4, 5]
    assert blender.remaining(13) == 3 and blender.remaining(16) == 0
    assert blender.action(40)[0] == 5  # past the end: hold the last target
    assert not blender.add(chunk([7, 7], start=0), now_tick=13)  # entirely in the past
    assert blender.version == "v1"


def test_crossfade_weights_ramp_linearly_over_the_window() -> None:
    blender = CrossfadeBlender(window=4)
    blender.add(chunk([0.0] * 10, start=0), now_tick=0)
    blender.add(chunk([1.0] * 10, start=2, version="v2"), now_tick=2)
    got = [float(blender.action(t)[0]) for t in range(2, 10)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0])
    assert blender.version == "v2"
    # A new chunk shorter than the window still ends purely on itself.
    blender.add(chunk([3.0, 3.0], start=4), now_tick=4)
    assert [float(blender.action(t)[0]) for t in (4, 5, 6)] == pytest.approx([0.6 + 2.4 / 2, 3, 3])
    blender.reset()
    assert blender.action(5) is None and blender.version == ""


def test_crossfade_blends_into_the_held_target_after_the_old_plan_ran_out() -> None:
    blender = CrossfadeBlender(window=1)
    blender.add(chunk([1, 2], start=0), now_tick=0)
    blender.add(chunk([10, 10, 10], start=4), now_tick=5)  # old plan ended at tick 2
    assert [float(blender.action(t)[0]) for t in (5, 6)] == pytest.approx([6.0, 10.0])


def test_crossfade_with_max_step_never_asks_for_more_than_the_gate_passes() -> None:
    blender = CrossfadeBlender(window=1, max_step=0.5)
    blender.add(chunk([0.0, 0.0], start=0), now_tick=0)
    blender.add(chunk([10.0] * 30, start=1), now_tick=1)  # a 10 rad leap, far beyond a fade
    got = np.array([float(blender.action(t)[0]) for t in range(0, 31)])
    assert np.abs(np.diff(got)).max() <= 0.5 + 1e-6
    assert got[-1] == pytest.approx(10.0)  # it still gets there


def test_temporal_ensembler_weights_older_chunks_exponentially() -> None:
    m = 0.5
    ens = TemporalEnsembler(m=m)
    ens.add(chunk([0.0] * 5, start=0), now_tick=0)
    ens.add(chunk([1.0] * 5, start=2, version="v2"), now_tick=2)
    w0, w1 = 1.0, np.exp(-m)
    assert float(ens.action(1)[0]) == 0.0  # only the first covers tick 1
    assert float(ens.action(3)[0]) == pytest.approx(w1 / (w0 + w1))
    assert float(ens.action(6)[0]) == 1.0  # only the second covers tick 6
    assert float(ens.action(50)[0]) == 1.0  # past all: hold the newest chunk's last target
    assert ens.remaining(3) == 4 and ens.version == "v2"


# -- the loop with a slow policy at realtime pace ---------------------------------------


class RealtimeClock:
    """Wall time from 0; sets `stop` once it passes `stop_at`."""

    def __init__(self, stop: threading.Event, stop_at: float) -> None:
        self.t0 = time.monotonic()
        self.stop = stop
        self.stop_at = stop_at

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)
        if self.now() >= self.stop_at:
            self.stop.set()


class RecordingHardware:
    """Commands go through unclamped (so the test sees the blending, not a safety gate)."""

    camera_names = ("overhead",)

    def __init__(self, clock: RealtimeClock) -> None:
        self.clock = clock
        self.q = np.zeros(14, np.float32)
        self.commands: list[np.ndarray] = []
        self.observed_at: list[float] = []

    def observe(self) -> Observation:
        stamp = self.clock.now()
        self.observed_at.append(stamp)
        image = np.zeros((8, 8, 3), np.uint8)
        return Observation(self.q.copy(), {"overhead": Frame("overhead", image, stamp)}, stamp)

    def command(self, targets: np.ndarray) -> np.ndarray:
        self.q = np.asarray(targets, np.float32).copy()
        self.commands.append(self.q.copy())
        return self.q.copy()

    def hold(self) -> None:
        pass


class Scene:
    tasks = ("pick_cube",)

    def reset(self, task: str, seed: int) -> None:
        pass

    def success(self) -> bool:
        return False

    def reward(self) -> float:
        return 0.0


class Operator:
    def wants_control(self) -> bool:
        return False

    def action(self) -> np.ndarray:
        return np.full(14, 99.0, np.float32)


VELOCITY = 0.01  # rad per tick of the fake plan
MAX_STEP = 0.05  # the gate's per-tick limit the commanded targets must respect


class SlowRunner:
    """Takes `delay_s` per predict; plans a steady move on from the observed joints, with a
    version-specific offset (a hard swap between versions would jump by `offset`)."""

    def __init__(self, version: str, delay_s: float, offset: float = 0.0, k: int = 20) -> None:
        self.version_id = version
        self.delay_s = delay_s
        self.offset = offset
        self.k = k
        self.calls = 0

    def predict(self, frames, joint_pos, task) -> np.ndarray:
        self.calls += 1
        time.sleep(self.delay_s)
        steps = np.arange(1, self.k + 1, dtype=np.float32)[:, None] * VELOCITY
        return (np.asarray(joint_pos, np.float32)[None] + steps + self.offset).astype(np.float32)


class Watcher:
    def __init__(self, clock: RealtimeClock, schedule: list[tuple[float, SlowRunner]]) -> None:
        self.clock = clock
        self.schedule = schedule

    def take_new(self) -> SlowRunner | None:
        if self.schedule and self.schedule[0][0] <= self.clock.now():
            return self.schedule.pop(0)[1]
        return None


def run_realtime(
    schedule: list[tuple[float, SlowRunner]],
    seconds: float,
    blender: CrossfadeBlender | None = None,
) -> tuple[ControlLoop, RecordingHardware]:
    stop = threading.Event()
    clock = RealtimeClock(stop, seconds)
    hardware = RecordingHardware(clock)
    loop = ControlLoop(
        ActorConfig(
            cell_id="cell-01", learner_address="127.0.0.1:1", control_hz=HZ, max_episode_s=60
        ),
        hardware,  # type: ignore[arg-type]
        Scene(),
        Operator(),
        clock,
        type("Sink", (), {"submit": lambda self, c: True})(),
        Watcher(clock, schedule),  # type: ignore[arg-type]
        blender=blender,
    )
    loop.run(stop)
    return loop, hardware


def lateness(observed_at: list[float]) -> tuple[float, float]:
    """p50, p99 of how late each tick started against the ideal schedule."""
    t = np.asarray(observed_at)
    late = np.maximum(0.0, t - (t[0] + PERIOD * np.arange(len(t))))
    return float(np.percentile(late, 50)), float(np.percentile(late, 99))


def test_slow_policy_never_stalls_the_loop_nor_jumps_across_a_version_swap() -> None:
    v1 = SlowRunner("v1", delay_s=3 * PERIOD)
    v2 = SlowRunner("v2", delay_s=3 * PERIOD, offset=0.1)  # a hard swap would jump 0.1
    loop, hw = run_realtime([(0.0, v1), (1.2, v2)], seconds=2.5)
    stats = loop.stats
    p50, p99 = lateness(hw.observed_at)
    ready_rate = stats["chunks_ready_in_time"] / max(1, stats["chunks_followup"])
    print(
        f"\nslow runner (predict {3 * PERIOD * 1e3:.0f} ms = 3 ticks): {len(hw.commands)} ticks,"
        f" lateness p50 {p50 * 1e3:.2f} ms p99 {p99 * 1e3:.2f} ms, late_ticks"
        f" {stats['late_ticks']}, chunks blended {stats['chunks_blended']}, ready before"
        f" needed {ready_rate:.0%}, plan exhausted ticks {stats['plan_exhausted_ticks']}"
    )
    assert stats["late_ticks"] == 0
    assert len(hw.commands) == pytest.approx(2.5 * HZ, abs=3)
    assert p99 < PERIOD
    assert v1.calls >= 3 and v2.calls >= 3  # inference kept going beside the loop
    assert stats["version_running"] == "v2"
    assert [a["version"] for a in stats["versions_adopted"]] == ["v1", "v2"]
    commands = np.asarray(hw.commands)
    moving = commands[~np.all(commands == 0.0, axis=1)]  # from the first chunk on
    steps = np.abs(np.diff(moving, axis=0)).max(axis=1)
    assert steps.max() <= MAX_STEP, f"largest per-tick change {steps.max():.3f}"
    assert moving[-1, 0] > 0.1 + 0.3  # the v2 plan (offset) took over and kept moving
    assert stats["plan_exhausted_ticks"] == 0 and ready_rate >= 0.9
    assert stats["interventions"] == 0


def test_a_stuck_policy_holds_the_last_target_without_missing_a_tick() -> None:
    stuck = SlowRunner("v1", delay_s=15 * PERIOD, k=20)  # each chunk runs out long before
    # Chunks 15 ticks late: the crossfade alone would ask for a bigger step; the blender
    # rate-limits to the gate's max step (the loop passes the cell gate's limit by default).
    loop, hw = run_realtime(
        [(0.0, stuck)], seconds=2.2, blender=CrossfadeBlender(max_step=MAX_STEP)
    )
    stats = loop.stats
    assert stats["late_ticks"] == 0
    assert len(hw.commands) == pytest.approx(2.2 * HZ, abs=3)
    assert stats["plan_exhausted_ticks"] > 5  # it held the last target while waiting
    commands = np.asarray(hw.commands)
    assert np.abs(np.diff(commands, axis=0)).max() <= MAX_STEP + 1e-6


def test_threaded_inference_hands_over_newest_snapshot_only() -> None:
    runner = SlowRunner("v1", delay_s=0.1, k=3)
    inference = ThreadedInference("cell-01")
    inference.start()
    try:
        frames = {"overhead": np.zeros((4, 4, 3), np.uint8)}
        for tick in range(4):  # the first starts; the next three replace each other
            time.sleep(0.03 if tick == 1 else 0.0)  # let the worker pick up the first
            inference.submit(Snapshot(frames, np.zeros(14, np.float32), "pick_cube", tick, runner))
        assert inference.busy
        deadline = time.monotonic() + 5
        ticks: list[int] = []
        while len(ticks) < 2 and time.monotonic() < deadline:
            result = inference.poll()
            if result is not None and result.chunk is not None:
                ticks.append(result.chunk.start_tick)
            time.sleep(0.01)
        assert ticks == [0, 3]
        assert runner.calls == 2 and inference.stats["superseded"] == 2
    finally:
        inference.stop()


# -- the real sim cell with a real tiny policy -------------------------------------------


def test_sim_cell_with_a_tiny_policy_keeps_20_hz() -> None:
    import torch

    from drivers.sim import SIM_TASKS, make_sim_cell
    from fleet.common.policy.config import policy_config
    from fleet.common.policy.model import UnifiedPolicy
    from fleet.common.policy.runtime import PolicyRunner

    torch.manual_seed(0)
    cameras = ("overhead", "front")
    runner = PolicyRunner(UnifiedPolicy(policy_config("tiny", SIM_TASKS, cameras)), "v-tiny")
    cell = make_sim_cell("cell-03", seed=0, cameras=cameras, height=48, width=64, takeover_prob=0.0)
    stop = threading.Event()
    offered = [runner]

    class Once:
        def take_new(self) -> PolicyRunner | None:
            return offered.pop() if offered else None

    loop = ControlLoop(
        ActorConfig(cell_id="cell-03", learner_address="127.0.0.1:1", max_episode_s=60),
        cell.hardware,
        cell.scene,
        cell.operator,
        cell.clock,
        type("Sink", (), {"submit": lambda self, c: True})(),
        Once(),
    )
    timer = threading.Timer(3.0, stop.set)
    timer.start()
    loop.run(stop)
    timer.cancel()
    stats = loop.stats
    print(f"\nsim + tiny policy: {stats['loop_hz']:.2f} Hz, inference {stats['inference']}")
    assert stats["loop_hz"] == pytest.approx(20.0, rel=0.1)
    assert stats["late_ticks"] <= 1
    assert stats["chunks_blended"] >= 2 and stats["policy_errors"] == 0
    assert stats["steps_recorded"] >= 50 and stats["interventions"] == 0


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class NiceRunner(SlowRunner):
    """Notes the CPU priority (niceness) of the thread each predict runs on."""

    def __init__(self) -> None:
        super().__init__("v1", 0.0)
        self.nice: list[int] = []

    def predict(self, frames, joint_pos, task) -> np.ndarray:
        self.nice.append(_nice())
        return super().predict(frames, joint_pos, task)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priority is Linux's")
def test_inference_and_recording_run_below_the_loops_priority() -> None:
    """On a busy cell computer the tick thread gets a core first: acting inference and the
    recorder's encoding run on threads of lower priority than the loop's own thread."""
    runner = NiceRunner()
    recorded_nice: list[int] = []
    stop = threading.Event()
    clock = RealtimeClock(stop, 0.5)
    loop_nice: list[int] = []

    class Sink:
        def submit(self, chunk: object) -> bool:
            recorded_nice.append(_nice())
            return True

    hardware = RecordingHardware(clock)
    observe = hardware.observe

    def observe_noting_priority() -> Observation:
        loop_nice.append(_nice())
        return observe()

    hardware.observe = observe_noting_priority  # type: ignore[method-assign]
    loop = ControlLoop(
        ActorConfig(
            cell_id="cell-01", learner_address="127.0.0.1:1", control_hz=HZ, max_episode_s=60
        ),
        hardware,  # type: ignore[arg-type]
        Scene(),
        Operator(),
        clock,
        Sink(),
        Watcher(clock, [(0.0, runner)]),  # type: ignore[arg-type]
    )
    loop.run(stop)
    assert runner.nice and recorded_nice and loop_nice
    assert min(runner.nice) > max(loop_nice)
    assert min(recorded_nice) > max(loop_nice)

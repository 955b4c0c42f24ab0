"""The edge actor's control loop: fixed rate on the cell clock, every episode's steps sent,
policy swaps blended in without a jump, operator steps flagged as interventions; then the
whole actor on a simulated cell against the real learner gateway."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest

from actors.config import ActorConfig
from actors.control_loop import ControlLoop
from actors.edge import run_actor
from actors.inference import InlineInference
from drivers.cell import CellFault
from drivers.clock import WallClock
from drivers.interfaces import DriverFault, Frame, Observation
from drivers.sim import SIM_TASKS, make_sim_cell
from learner.chunks import DecodedChunk, decode_chunk
from protos.fleetlearn.v1 import trajectory_pb2
from tests.waiting import wait_for

HZ = 20.0
PERIOD = 1.0 / HZ
OPERATOR = 99.0  # the fake operator's action value, so its steps are recognisable


# -- fakes ------------------------------------------------------------------------------


class FakeClock:
    """Virtual time: sleep_until jumps there at once; stop is set once time reaches stop_at."""

    def __init__(self, stop: threading.Event, stop_at: float) -> None:
        self.t = 0.0
        self.stop = stop
        self.stop_at = stop_at

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)
        if self.t >= self.stop_at - 1e-9:
            self.stop.set()


class FakeHardware:
    camera_names = ("overhead",)

    def __init__(self, clock: FakeClock, slow_at: float | None = None, slow_s: float = 0.0):
        self.clock = clock
        self.q = np.zeros(14, np.float32)
        self.slow_at = slow_at  # one command at this time takes slow_s (a late tick)
        self.slow_s = slow_s
        self.held = 0

    def observe(self) -> Observation:
        image = np.full((12, 16, 3), 128, np.uint8)
        stamp = self.clock.now()
        return Observation(
            joint_pos=self.q.copy(),
            frames={"overhead": Frame("overhead", image, stamp)},
            stamp=stamp,
        )

    def command(self, targets: np.ndarray) -> np.ndarray:
        if self.slow_at is not None and self.clock.t >= self.slow_at - 1e-9:
            self.slow_at = None
            self.clock.t += self.slow_s
        self.q = np.asarray(targets, np.float32).copy()
        return self.q.copy()

    def hold(self) -> None:
        self.held += 1


class FakeScene:
    tasks = ("pick_cube", "touch_target")

    def __init__(self, clock: FakeClock, success_after: dict[str, float]) -> None:
        self.clock = clock
        self.success_after = success_after
        self.resets: list[tuple[str, int]] = []
        self.t0 = 0.0
        self.task = ""

    def reset(self, task: str, seed: int) -> None:
        self.resets.append((task, seed))
        self.t0 = self.clock.now()
        self.task = task

    def success(self) -> bool:
        return self.clock.now() - self.t0 >= self.success_after.get(self.task, np.inf) - 1e-9

    def reward(self) -> float:
        return 1.0 if self.success() else -0.5


class FakeOperator:
    def __init__(self, clock: FakeClock, takes_over: Callable[[float], bool] = lambda t: False):
        self.clock = clock
        self.takes_over = takes_over
        self.forced = False
        self.force_calls: list[bool] = []

    def wants_control(self) -> bool:
        return self.forced or self.takes_over(self.clock.now())

    def action(self) -> np.ndarray:
        return np.full(14, OPERATOR, np.float32)

    def force(self, on: bool) -> None:
        self.forced = on
        self.force_calls.append(on)


class FakeRunner:
    """action[:, 0] = version number, action[:, 1] = index within the chunk."""

    def __init__(self, number: int, k: int = 5, fail: bool = False) -> None:
        self.version_id = f"v{number}"
        self.number = number
        self.k = k
        self.fail = fail
        self.calls = 0

    def predict(self, frames, joint_pos, task) -> np.ndarray:
        self.calls += 1
        if self.fail:
            raise ValueError("no frame from camera(s) ['front']")
        assert set(frames) == {"overhead"} and frames["overhead"].dtype == np.uint8
        assert task in FakeScene.tasks and np.shape(joint_pos) == (14,)
        chunk = np.zeros((self.k, 14), np.float32)
        chunk[:, 0] = self.number
        chunk[:, 1] = np.arange(self.k)
        return chunk


class FakeWatcher:
    """Offers each runner once the clock reaches its time."""

    def __init__(self, clock: FakeClock, schedule: list[tuple[float, FakeRunner]]) -> None:
        self.clock = clock
        self.schedule = sorted(schedule, key=lambda x: x[0])

    def take_new(self) -> FakeRunner | None:
        ready = [r for t, r in self.schedule if t <= self.clock.now() + 1e-9]
        if not ready:
            return None
        self.schedule = self.schedule[len(ready) :]
        return ready[-1]


class FakeUplink:
    def __init__(self) -> None:
        self.chunks: list[trajectory_pb2.StepChunk] = []

    def submit(self, chunk: trajectory_pb2.StepChunk) -> bool:
        self.chunks.append(chunk)
        return True


def run_loop(
    *,
    stop_at: float,
    success_after: dict[str, float] | None = None,
    schedule: list[tuple[float, FakeRunner]] | None = None,
    takes_over: Callable[[float], bool] = lambda t: False,
    slow_at: float | None = None,
    **config: object,
) -> tuple[ControlLoop, FakeUplink, FakeOperator, list[str]]:
    stop = threading.Event()
    clock = FakeClock(stop, stop_at)
    operator = FakeOperator(clock, takes_over)
    uplink = FakeUplink()
    faults: list[str] = []
    settings: dict = {"control_hz": HZ, "chunk_steps": 7, "max_episode_s": 1.0, **config}
    loop = ControlLoop(
        ActorConfig(cell_id="cell-01", learner_address="127.0.0.1:1", **settings),
        FakeHardware(clock, slow_at=slow_at, slow_s=0.3),
        FakeScene(clock, success_after or {}),
        operator,
        clock,
        uplink,
        FakeWatcher(clock, schedule) if schedule is not None else None,
        on_fault=faults.append,
        inference=InlineInference(),  # virtual time: a chunk is ready on the tick it is asked
    )
    loop.run(stop)
    return loop, uplink, operator, faults


def episodes_of(chunks: list[trajectory_pb2.StepChunk]) -> dict[str, list[DecodedChunk]]:
    """Chunks by episode, each checked by the learner's own validation."""
    out: dict[str, list[DecodedChunk]] = {}
    for chunk in chunks:
        out.setdefault(chunk.episode_id, []).append(decode_chunk(chunk, known_tasks=SIM_TASKS))
    return out


def steps_of(episode: list[DecodedChunk]) -> list[tuple[float, int, int, bool, str]]:
    """(stamp, action[0], action[1], intervention, version) per step of an episode."""
    return [
        (
            float(c.timestamp[i]),
            int(c.action[i, 0]),
            int(c.action[i, 1]),
            bool(c.intervention[i]),
            c.policy_version,
        )
        for c in episode
        for i in range(c.n_steps)
    ]


# -- the loop with fakes ----------------------------------------------------------------


def test_episodes_run_back_to_back_and_every_step_is_sent() -> None:
    loop, uplink, operator, _ = run_loop(stop_at=3.2, success_after={"pick_cube": 0.5})
    episodes = episodes_of(uplink.chunks)
    assert len(episodes) == 5
    outcomes, sizes = [], []
    for chunks in episodes.values():
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
        starts = np.cumsum([0] + [c.n_steps for c in chunks[:-1]])
        assert [c.first_step for c in chunks] == list(starts)
        assert all(c.n_steps <= 7 for c in chunks)
        outcomes.append((chunks[0].task, chunks[-1].outcome["reason"]))
        sizes.append(sum(c.n_steps for c in chunks))
    assert outcomes == [
        ("pick_cube", "success"),
        ("touch_target", "timeout"),
        ("pick_cube", "success"),
        ("touch_target", "timeout"),
        ("pick_cube", "aborted"),  # stopped: the steps recorded so far still go out
    ]
    assert sizes == [10, 20, 10, 20, 4]
    last_success = next(iter(episodes.values()))[-1]
    assert last_success.outcome["success"] and last_success.reward[-1] == 1.0
    stats = loop.stats
    assert stats["steps_recorded"] == sum(sizes) == stats["interventions"]
    assert stats["episodes"] == 4 and stats["episodes_aborted"] == 1  # finished vs cut short
    assert stats["successes"] == 2
    # No policy yet: the operator drives every step (demonstrations) without a version.
    assert operator.force_calls == [True]
    for chunks in episodes.values():
        assert all(c.intervention.all() and c.policy_version == "" for c in chunks)
        assert all((c.action == OPERATOR).all() for c in chunks)


def test_new_versions_swap_in_through_blending() -> None:
    """Semantics changed with edge inference beside the loop: a new version is adopted as
    soon as it is offered and its first chunk is crossfaded into the old plan (no longer
    "only at a chunk boundary"), so the commanded targets move without a jump."""
    v1, v2, v3 = FakeRunner(1, k=5), FakeRunner(2, k=5), FakeRunner(3, k=4)
    loop, uplink, operator, _ = run_loop(
        stop_at=2.6, max_episode_s=2.0, schedule=[(0.0, v1), (0.37, v2), (1.12, v3)]
    )
    episodes = list(episodes_of(uplink.chunks).values())
    assert len(episodes) == 2
    first = [
        (float(c.timestamp[i]), float(c.action[i, 0]), c.policy_version)
        for c in episodes[0]
        for i in range(c.n_steps)
    ]
    steps = steps_of(episodes[0]) + steps_of(episodes[1])
    assert not any(s[3] for s in steps)  # the policy drove every step
    # Version numbers ramp 1 -> 2 -> 3 by about 1/(window+1) per tick (4-tick crossfade,
    # 3 ticks for v3's 4-step chunks; a chunk blended in mid-fade steepens it a little),
    # never backwards.
    values = np.array([v for _, v, _ in first])
    assert np.all(np.diff(values) >= -1e-6) and np.max(np.diff(values)) <= 0.35
    first_v2 = next(s for s in first if s[2] == "v2")
    assert first_v2[0] == pytest.approx(0.4)  # the first tick after v2 arrived at 0.37
    assert first_v2[1] == pytest.approx(1.2)  # ...blending in, not jumping
    assert next(s for s in first if s[1] == 2.0)[0] == pytest.approx(0.6)
    first_v3 = next(s for s in first if s[2] == "v3")
    assert first_v3[0] == pytest.approx(1.15)
    assert next(s for s in first if s[1] == 3.0)[0] <= 1.4 + 1e-9
    # The second episode starts from a fresh v3 plan.
    assert all(s[1] == 3 and s[4] == "v3" for s in steps_of(episodes[1]))
    adopted = loop.stats["versions_adopted"]
    assert [a["version"] for a in adopted] == ["v1", "v2", "v3"]
    assert all(isinstance(a["adopted_at"], float) for a in adopted)
    assert loop.stats["version_running"] == "v3"
    assert operator.force_calls == [False]  # a policy from the first tick: never forced


def test_operator_takeover_steps_are_flagged_as_interventions() -> None:
    runner = FakeRunner(1, k=6)
    loop, uplink, _, _ = run_loop(
        stop_at=1.0,
        max_episode_s=5.0,
        schedule=[(0.0, runner)],
        takes_over=lambda t: 0.4 - 1e-9 <= t < 0.8 - 1e-9,
    )
    steps = steps_of(next(iter(episodes_of(uplink.chunks).values())))
    assert len(steps) == 20
    for stamp, value, _, intervention, _ in steps:
        took_over = 0.4 - 1e-9 <= stamp < 0.8 - 1e-9
        assert intervention == took_over
        assert (value == OPERATOR) == took_over
    after = [s for s in steps if s[0] >= 0.8 - 1e-9]
    assert after[0][2] == 0  # the policy replans from a fresh chunk after the takeover
    assert loop.stats["interventions"] == 8


def test_late_tick_is_counted_and_the_loop_resyncs() -> None:
    loop, uplink, _, _ = run_loop(stop_at=2.0, max_episode_s=10.0, slow_at=0.5)
    stamps = steps_of(next(iter(episodes_of(uplink.chunks).values())))
    times = np.array([s[0] for s in stamps])
    gaps = np.diff(times)
    assert loop.stats["late_ticks"] == 1
    # One long gap for the slow tick, then the period again: no burst of catch-up ticks.
    assert (gaps > PERIOD * 1.5).sum() == 1
    assert np.allclose(gaps[gaps < PERIOD * 1.5], PERIOD)
    assert loop.stats["loop_hz"] == pytest.approx(HZ, rel=0.2)


def test_a_failing_version_falls_back_to_the_last_good_one() -> None:
    good, bad = FakeRunner(1, k=5), FakeRunner(2, k=5, fail=True)
    loop, uplink, _, faults = run_loop(
        stop_at=1.0, max_episode_s=5.0, schedule=[(0.0, good), (0.1, bad)]
    )
    steps = steps_of(next(iter(episodes_of(uplink.chunks).values())))
    assert bad.calls == 1
    assert faults and "v2" in faults[0] and "'v1'" in faults[0]
    assert loop.stats["version_running"] == "v1"
    assert loop.stats["policy_errors"] == 1
    # Semantics changed with edge inference beside the loop: the failed version's chunk
    # never arrives, so the loop keeps executing v1's plan (no operator tick is needed).
    assert not any(s[3] for s in steps)
    assert [s[1] for s in steps] == [1] * 20


class FaultingHardware(FakeHardware):
    """The first command faults the cell (already made safe, as CellHardware does); enable()
    clears the fault. Counts how often the loop looked at the fault while waiting it out."""

    def __init__(self, clock: FakeClock, fault: CellFault) -> None:
        super().__init__(clock)
        self._fault: CellFault | None = None
        self.to_raise: CellFault | None = fault
        self.looks = 0
        self.enables = 0
        self.commands = 0

    @property
    def current_fault(self) -> CellFault | None:
        self.looks += 1
        return self._fault

    def command(self, targets: np.ndarray) -> np.ndarray:
        if self.to_raise is not None:
            self._fault, self.to_raise = self.to_raise, None
            raise self._fault
        self.commands += 1
        return super().command(targets)

    def enable(self) -> None:
        self.enables += 1
        self._fault = None


def _loop_on(hardware: FaultingHardware, clock: FakeClock, faults: list[str]) -> ControlLoop:
    loop = ControlLoop(
        ActorConfig(cell_id="cell-01", learner_address="127.0.0.1:1", control_hz=HZ),
        hardware,
        FakeScene(clock, {}),
        FakeOperator(clock),
        clock,
        FakeUplink(),
        None,
        on_fault=faults.append,
        inference=InlineInference(),
    )
    loop.fault_retry_s = 0.005
    return loop


@pytest.mark.parametrize(
    "message",
    ["servo ID 2: hardware error 0x20 (overload)", "anything at all, reworded"],
)
def test_torque_off_fault_stays_idle_until_restarted(message: str) -> None:
    """A fault that turned torque off (a servo's hardware error) keeps the cell idle, never
    re-enabled, whatever the fault's words say: a person must look first."""
    stop = threading.Event()
    clock = FakeClock(stop, stop_at=1e9)
    hardware = FaultingHardware(clock, CellFault(message, torque_off=True))
    faults: list[str] = []
    loop = _loop_on(hardware, clock, faults)
    runner = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_for(lambda: hardware.looks >= 50, 30, "the loop to wait out the fault")
    finally:
        stop.set()
        runner.join(10)
    assert not runner.is_alive()
    assert hardware.enables == 0 and hardware.commands == 0
    assert faults and message in faults[0]


def test_communication_fault_is_retried_and_episodes_resume() -> None:
    """A fault that only held position (a servo went quiet) is retried, even when its text
    happens to say "torque off", and the loop carries on once enable() succeeds."""
    stop = threading.Event()
    clock = FakeClock(stop, stop_at=1e9)
    fault = CellFault("servo ID 5 silent; torque off was not needed", torque_off=False)
    hardware = FaultingHardware(clock, fault)
    loop = _loop_on(hardware, clock, [])
    runner = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_for(lambda: hardware.commands >= 5, 30, "episodes to resume after the fault")
    finally:
        stop.set()
        runner.join(10)
    assert not runner.is_alive()
    assert hardware.enables == 1


class LeaderFaultOperator(FakeOperator):
    """Drives every tick; its leader arms fail once (a bus error outside the cell's guard)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock, takes_over=lambda t: True)
        self.failures = 1

    def action(self) -> np.ndarray:
        if self.failures:
            self.failures -= 1
            raise DriverFault("arm leader_left: servo ID 3 on /dev/ttyUSB2: no status packet")
        return super().action()


class SafeMakingHardware(FaultingHardware):
    """FaultingHardware with CellHardware's make_safe (what a real cell offers the loop)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock, CellFault("unused", torque_off=False))
        self.to_raise = None
        self.made_safe: list[str] = []

    def make_safe(self, exc: DriverFault, doing: str) -> CellFault:
        self.made_safe.append(doing)
        self._fault = CellFault(f"{exc} (while {doing}; holding position)", torque_off=False)
        return self._fault


def test_a_leader_arm_fault_is_a_cell_fault_not_a_crash() -> None:
    """The operator's leader arms fail mid-episode: the cell is made safe, the fault is
    reported, and the loop carries on once the fault is cleared (it never dies)."""
    stop = threading.Event()
    clock = FakeClock(stop, stop_at=1e9)
    hardware = SafeMakingHardware(clock)
    faults: list[str] = []
    loop = _loop_on(hardware, clock, faults)
    loop.operator = LeaderFaultOperator(clock)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            loop.run(stop)
        except BaseException as exc:  # the failure this test is about
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        wait_for(lambda: hardware.commands >= 5 or errors, 30, "ticks after the leader fault")
    finally:
        stop.set()
        runner.join(10)
    assert not errors, errors
    assert hardware.made_safe == ["reading the operator"]
    assert faults and "leader_left" in faults[0]
    assert hardware.enables == 1


def test_loop_keeps_its_rate_on_the_wall_clock() -> None:
    stop = threading.Event()
    clock = WallClock()
    fake_clock = FakeClock(stop, stop_at=np.inf)
    hardware = FakeHardware(fake_clock)
    loop = ControlLoop(
        ActorConfig(cell_id="cell-01", learner_address="127.0.0.1:1", control_hz=50.0),
        hardware,
        FakeScene(fake_clock, {}),
        FakeOperator(fake_clock),
        clock,
        FakeUplink(),
        None,
    )
    timer = threading.Timer(1.0, stop.set)
    t0 = time.monotonic()
    timer.start()
    loop.run(stop)
    elapsed = time.monotonic() - t0
    stats = loop.stats
    # Never faster than the rate: a late loop resyncs instead of bursting to catch up.
    assert stats["steps_recorded"] <= 50 * elapsed * 1.05 + 1
    assert stats["loop_hz"] <= 50.0 * 1.05
    # Every period is either a tick or counted late: a loop starved of CPU (a loaded
    # machine) says so instead of silently running slow. (Its deadline and jitter under a
    # real load are measured by tests/bench/control_loop.py, not asserted here.)
    shortfall = 50 * elapsed - stats["steps_recorded"]
    if shortfall > 0.15 * 50 * elapsed:
        assert stats["late_ticks"] >= 1, stats
    assert stats["steps_recorded"] >= 5  # it ran at all


# -- the simulated cell -----------------------------------------------------------------


class StopAtClock:
    """A cell's clock that sets `stop` once its time passes `stop_at`."""

    def __init__(self, clock, stop: threading.Event, stop_at: float) -> None:
        self.clock = clock
        self.stop = stop
        self.stop_at = stop_at

    def now(self) -> float:
        return self.clock.now()

    def sleep_until(self, t: float) -> None:
        self.clock.sleep_until(t)
        if self.clock.now() >= self.stop_at:
            self.stop.set()


def test_sim_cell_demonstrations_are_recorded_whole() -> None:
    cell = make_sim_cell(
        "cell-07", seed=3, cameras=("overhead",), height=48, width=64, realtime_factor=0.0
    )
    stop = threading.Event()
    clock = StopAtClock(cell.clock, stop, stop_at=20.0)
    uplink = FakeUplink()
    loop = ControlLoop(
        ActorConfig(cell_id="cell-07", learner_address="127.0.0.1:1"),
        cell.hardware,
        cell.scene,
        cell.operator,
        clock,
        uplink,
        None,
    )
    loop.run(stop)
    episodes = list(episodes_of(uplink.chunks).values())
    assert len(episodes) >= 3
    for chunks in episodes:
        outcome = chunks[-1].outcome
        steps = sum(c.n_steps for c in chunks)
        assert 1 <= steps <= 160
        assert all(c.intervention.all() for c in chunks)
        assert chunks[-1].cameras["overhead"].height == 48
        if outcome["reason"] == "success":
            assert chunks[-1].reward[-1] == 1.0
    # The scripted expert solves the sim tasks: the completed episodes mostly succeed.
    completed = [e[-1].outcome for e in episodes if e[-1].outcome["reason"] != "aborted"]
    assert sum(o["success"] for o in completed) >= len(completed) - 1
    assert loop.stats["steps_recorded"] == sum(c.n_steps for e in episodes for c in e)


# -- the whole actor against the learner's real ingest and policy services ---------------


def test_run_actor_against_the_learner_services(registry, tmp_path: Path) -> None:
    """Demonstrations first, then the first published version adopted mid-run; every step
    recorded is acked durable and is in the episode store when run_actor returns."""
    import grpc
    import torch

    from fleet.common.policy.config import policy_config
    from fleet.common.policy.model import UnifiedPolicy
    from learner import ingest, policy_service
    from learner.ingest import IngestServicer
    from learner.policy_service import PolicyServicer
    from learner.publisher import Publisher
    from learner.store import EpisodeStore

    store = EpisodeStore(tmp_path / "store")
    ingest_servicer = IngestServicer(store, known_tasks=SIM_TASKS)
    policy = PolicyServicer(registry, poll_interval_s=0.05)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    ingest.add_to_server(server, ingest_servicer)
    policy_service.add_to_server(server, policy)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    cell = make_sim_cell(
        "cell-01",
        seed=1,
        cameras=("overhead", "front"),
        height=48,
        width=64,
        realtime_factor=0.0,
    )
    config = ActorConfig(
        cell_id="cell-01",
        learner_address=f"127.0.0.1:{port}",
        heartbeat_interval_s=0.1,
        rpc_deadline_s=5.0,
    )
    stop = threading.Event()
    version: list[str] = []

    def learner_side() -> None:
        # The fleet starts without a policy: publish the first version once data arrived,
        # then stop the cell shortly after its heartbeat says it runs that version.
        deadline = time.monotonic() + 20
        while store.totals()[0] < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        torch.manual_seed(0)
        model = UnifiedPolicy(policy_config("tiny", SIM_TASKS, ("overhead", "front")))
        manifest = Publisher(registry, tmp_path / "versions").publish(
            model, training_step=1, data_seen=100
        )
        version.append(manifest.version_id)
        while time.monotonic() < deadline:
            cells = {c.cell_id: c for c in registry.cells()}
            if cells.get("cell-01") and cells["cell-01"].version_running == manifest.version_id:
                break
            time.sleep(0.05)
        time.sleep(0.5)
        stop.set()

    helper = threading.Thread(target=learner_side)
    helper.start()
    try:
        summary = run_actor(config, cell, stop, drain_timeout_s=20.0)
    finally:
        stop.set()
        helper.join(30)
        policy.stop()
        server.stop(0).wait(5)
    assert summary["flushed"] and summary["unacked"] == 0
    assert summary["dropped"] == summary["rejected"] == 0
    assert summary["steps_sent"] == summary["steps_recorded"] > 100
    assert store.totals()[0] == summary["steps_sent"]
    assert summary["versions_adopted"] == version
    assert summary["episodes"] >= 1
    final = next(c for c in registry.cells() if c.cell_id == "cell-01")
    assert (
        final.counters.steps_acked == summary["steps_sent"]
    )  # the last heartbeat came after the drain
    assert [a["version"] for a in final.versions_adopted] == version

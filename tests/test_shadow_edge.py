"""Shadow evaluation on the edge: a candidate in stage "shadow" infers beside stable on the
same observations, its actions are uploaded beside the executed ones and scored by the
learner, and it never acts.

End to end with real pieces: the learner gateway (ingest + policy service, real gRPC on
loopback, real Redis), signed versions from the publisher, and two kinematic sim cells each
running the real PolicyWatcher, ControlLoop and Uplink. The candidate is built to be
unmistakable: its head's bias saturates every target at the joint limits, so it always asks
for one fixed pose (the upper limits) that stable, which holds the arms where they are,
never commands. Smaller tests pin the recorder's and the loop's rules with fakes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from rich.console import Console

from actors.config import ActorConfig
from actors.control_loop import ControlLoop
from actors.inference import Inference, InlineInference, ThreadedInference
from actors.policy_watch import PolicyWatcher
from actors.recorder import EpisodeRecorder
from actors.uplink import Uplink
from drivers.interfaces import Frame
from drivers.sim import make_sim_cell
from fleet.common import signing
from fleet.common.policy.config import policy_config
from fleet.common.policy.model import UnifiedPolicy
from fleet.control import rollout
from fleet.control.registry import Registry
from fleet.control.status_view import render
from learner import policy_service
from learner.chunks import DecodedChunk, decode_chunk
from learner.gateway import Gateway
from learner.policy_service import PolicyServicer
from learner.publisher import Publisher
from learner.shadow_scoring import shadow_score
from protos.fleetlearn.v1 import policy_pb2, policy_pb2_grpc, trajectory_pb2
from protos.joint_layout import JOINT_UPPER
from tests.test_control_loop import (
    HZ,
    FakeClock,
    FakeHardware,
    FakeOperator,
    FakeRunner,
    FakeScene,
    FakeUplink,
)
from tests.waiting import wait_for

TASK = "pick_cube"
CAMERAS = ("overhead",)
SHADOW_CELL, PLAIN_CELL = "cell-shadow", "cell-plain"
POSE = np.asarray(JOINT_UPPER, np.float32)  # what the candidate always asks for


def models() -> tuple[UnifiedPolicy, UnifiedPolicy]:
    """Stable (an untrained model: its chunk holds the current joints) and the candidate
    (every target pushed far past the limits, so clipped to the upper limits: one pose)."""
    config = policy_config("tiny", [TASK], CAMERAS, chunk_len=20)
    torch.manual_seed(0)
    stable = UnifiedPolicy(config)
    candidate = UnifiedPolicy(config)
    with torch.no_grad():
        candidate.head.bias.fill_(10.0)
    return stable, candidate


class TeeUplink:
    """The real uplink, keeping a copy of every chunk the loop submits."""

    def __init__(self, uplink: Uplink) -> None:
        self.uplink = uplink
        self._lock = threading.Lock()
        self._chunks: list[trajectory_pb2.StepChunk] = []

    def submit(self, chunk: trajectory_pb2.StepChunk) -> bool:
        with self._lock:
            self._chunks.append(chunk)
        return self.uplink.submit(chunk)

    @property
    def chunks(self) -> list[trajectory_pb2.StepChunk]:
        with self._lock:
            return list(self._chunks)


@dataclass
class EdgeCell:
    cell_id: str
    watcher: PolicyWatcher
    loop: ControlLoop
    uplink: Uplink
    tee: TeeUplink
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    faults: list[str] = field(default_factory=list)

    def decoded(self) -> list[DecodedChunk]:
        return [decode_chunk(c, known_tasks=[TASK]) for c in self.tee.chunks]


def start_cell(cell_id: str, address: str, public_key: Path, seed: int) -> EdgeCell:
    # Real time, as a cell runs: flat out, the loop outruns any inference worker and on a
    # loaded machine the shadow (a low-priority worker) would rarely cover a whole chunk.
    sim = make_sim_cell(
        cell_id, seed=seed, cameras=CAMERAS, height=48, width=64, realtime_factor=1.0
    )
    config = ActorConfig(
        cell_id=cell_id,
        learner_address=address,
        tasks=(TASK,),
        chunk_steps=10,
        max_episode_s=3.0,
        rpc_deadline_s=5.0,
        seed=seed,
    )
    faults: list[str] = []
    uplink = Uplink(
        address, deadline_s=5.0, max_queue=4096, cell_id=cell_id, on_fault=faults.append
    )
    watcher = PolicyWatcher(
        address,
        cell_id,
        deadline_s=5.0,
        on_fault=faults.append,
        verify_key=signing.load_public_key(public_key),
    )
    tee = TeeUplink(uplink)
    loop = ControlLoop(
        config,
        sim.hardware,
        sim.scene,
        sim.operator,
        sim.clock,
        tee,
        watcher,
        on_fault=faults.append,
    )
    cell = EdgeCell(cell_id, watcher, loop, uplink, tee, faults=faults)
    uplink.start()
    watcher.start()
    cell.thread = threading.Thread(target=loop.run, args=(cell.stop,), name=f"loop-{cell_id}")
    cell.thread.start()
    return cell


def stop_cell(cell: EdgeCell) -> None:
    cell.stop.set()
    if cell.thread is not None:
        cell.thread.join(20)
    cell.watcher.stop()
    assert cell.uplink.flush(20.0), f"{cell.cell_id}: chunks left unacked"
    cell.uplink.stop()


def shadow_chunks(chunks: list[DecodedChunk]) -> list[DecodedChunk]:
    return [c for c in chunks if c.shadow_action is not None]


def test_candidate_in_shadow_is_logged_scored_and_never_executed(
    redis_server: str, tmp_path: Path
) -> None:
    url = redis_server.rsplit("/", 1)[0] + "/5"  # the gateway uses the default key prefix
    registry = Registry(url)
    registry.r.flushdb()
    private, public = signing.write_key_pair(tmp_path / "keys")
    gateway = Gateway(tmp_path / "store", url, [TASK])
    gateway.policy.poll_interval_s = 0.05
    address = f"127.0.0.1:{gateway.start()}"
    publisher = Publisher(registry, tmp_path / "versions", rollout_mode="auto", signing_key=private)
    stable_model, candidate_model = models()
    stable = publisher.publish(stable_model, training_step=1, data_seen=1).version_id
    candidate = publisher.publish(candidate_model, training_step=2, data_seen=2).version_id
    registry.set_stable(stable, actor="test", reason="the fleet's version")

    cells = [
        start_cell(SHADOW_CELL, address, public, seed=1),
        start_cell(PLAIN_CELL, address, public, seed=2),
    ]
    shadowed, plain = cells
    try:
        # The shadow run starts while the cells already run stable.
        wait_for(
            lambda: all(c.loop.stats["version_running"] == stable for c in cells),
            15,
            "both cells to run stable",
        )
        rollout.start_shadow(registry, candidate, [SHADOW_CELL], actor="test", reason="shadow")
        wait_for(
            lambda: len(shadow_chunks(shadowed.decoded())) >= 4 and len(plain.tee.chunks) >= 4,
            20,
            "shadow actions from the shadow cell and chunks from the other",
        )
        assert shadowed.watcher.shadow_version == candidate
        assert shadowed.loop.stats["shadow_version"] == candidate
        assert plain.watcher.shadow_runner is None and plain.loop.stats["shadow_calls"] == 0

        # Ending the shadow run (here: rolling the candidate back) makes the cell drop it.
        rollout.rollback(registry, actor="test", reason="shadow run over")
        wait_for(
            lambda: shadowed.loop.stats["shadow_version"] == "", 10, "the cell to drop the shadow"
        )
        assert shadowed.watcher.shadow_runner is None
        dropped_at = len(shadowed.tee.chunks)
        wait_for(lambda: len(shadowed.tee.chunks) >= dropped_at + 4, 10, "chunks after the drop")
    finally:
        for cell in cells:
            stop_cell(cell)
        gateway.stop(1.0)

    for cell in cells:
        chunks = cell.decoded()
        assert chunks and all(c.policy_version in ("", stable) for c in chunks)
        assert cell.loop.stats["policy_errors"] == 0
        for c in chunks:
            executed = c.action[~c.intervention]
            # Executed actions come from stable (or an operator), never the candidate's pose.
            assert not np.isclose(c.action, POSE, atol=1e-4).all(axis=1).any()
            if len(executed):
                assert c.policy_version == stable
        assert not any("shadow" in f for f in cell.faults), cell.faults

    shadow = shadow_chunks(shadowed.decoded())
    print("shadow cell stats:", {k: v for k, v in shadowed.loop.stats.items() if "shadow" in k})
    assert len(shadow) >= 4
    for c in shadow:
        assert c.shadow_version == candidate and c.shadow_action is not None
        assert c.shadow_action.shape == (c.n_steps, 14)
        np.testing.assert_allclose(c.shadow_action, np.broadcast_to(POSE, c.shadow_action.shape))
    # Two chunks of slack for the steps recorded before the loop saw the drop.
    after = shadowed.decoded()[dropped_at + 2 :]
    assert after and not shadow_chunks(after)
    assert not shadow_chunks(plain.decoded())

    # The learner scored exactly what the cell sent (every chunk was acked durable).
    scores = registry.shadow_scores()
    assert set(scores) == {candidate}
    sent = [shadow_score(c) for c in shadow]
    score = scores[candidate]
    assert score.steps == sum(s.steps for s in sent if s is not None)
    assert score.operator_steps == sum(s.operator_steps for s in sent if s is not None)
    assert score.steps + score.operator_steps == sum(c.n_steps for c in shadow)
    means = [score.mean_dist_stable, score.mean_dist_operator]
    assert any(m is not None for m in means)
    assert all(m is None or m > 0.1 for m in means)  # the fixed pose is far from what was done
    console = Console(width=200, record=True)
    console.print(render(registry))
    text = console.export_text()
    assert "shadow evaluation" in text and candidate in text
    registry.r.flushdb()
    registry.close()


# -- a shadow that cannot be verified never touches the acting version ------------------


@pytest.fixture
def policy_server(registry: Registry) -> Iterator[tuple[PolicyServicer, str]]:
    servicer = PolicyServicer(registry, poll_interval_s=0.05)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    policy_service.add_to_server(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    servicer.stop()
    server.stop(0).wait(5)


def test_assignment_carries_the_shadow_and_a_bad_shadow_leaves_acting_alone(
    registry: Registry, policy_server: tuple[PolicyServicer, str], tmp_path: Path
) -> None:
    _, address = policy_server
    private, public = signing.write_key_pair(tmp_path / "keys")
    forged, _ = signing.write_key_pair(tmp_path / "other")
    stable_model, candidate_model = models()
    stable = Publisher(registry, tmp_path / "v", rollout_mode="auto", signing_key=private)
    bad = Publisher(registry, tmp_path / "v", rollout_mode="auto", signing_key=forged)
    v1 = stable.publish(stable_model, training_step=1, data_seen=1)
    v2 = bad.publish(candidate_model, training_step=2, data_seen=2)  # signed by a wrong key
    registry.set_stable(v1.version_id, actor="test", reason="stable")
    rollout.start_shadow(registry, v2.version_id, ["cell-a"], actor="test", reason="shadow")

    # The assignment a shadow cell receives names the shadow and carries what verifies it.
    with grpc.insecure_channel(address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        for cell_id, shadow in (("cell-a", v2), ("cell-b", None)):
            call = stub.WatchAssignment(policy_pb2.WatchRequest(cell_id=cell_id), timeout=5)
            first = next(iter(call))
            call.cancel()
            assert first.version_id == v1.version_id and first.sha256 == v1.sha256
            if shadow is None:
                assert first.shadow_version_id == "" and not first.HasField("shadow")
            else:
                assert first.shadow_version_id == shadow.version_id
                assert first.shadow.version_id == shadow.version_id
                assert first.shadow.sha256 == shadow.sha256 and first.shadow.signature
                assert first.shadow.size_bytes > 0 and first.shadow.manifest_json

    faults: list[str] = []
    watcher = PolicyWatcher(
        address,
        "cell-a",
        deadline_s=5.0,
        on_fault=faults.append,
        verify_key=signing.load_public_key(public),
    )
    watcher.start()
    try:
        wait_for(lambda: faults, 10, "the forged shadow to be reported")
        runner = watcher.take_new()
        assert runner is not None and runner.version_id == v1.version_id
        assert watcher.shadow_runner is None and watcher.current_shadow_assignment == v2.version_id
        assert len(faults) == 1 and "shadow version" in faults[0] and v2.version_id in faults[0]
        weights = Path(registry.version(v1.version_id).weights_path)
        assert watcher.bytes_fetched == weights.stat().st_size  # the shadow never fetched
    finally:
        watcher.stop()


# -- the loop's and the recorder's rules, with fakes on a virtual clock -----------------


class ShadowWatcher:
    """Offers `acting` at once and `shadow` as the shadow runner while `shadow_on` holds."""

    def __init__(
        self,
        clock: FakeClock,
        acting: FakeRunner,
        shadow: FakeRunner,
        shadow_on: Callable[[float], bool],
    ) -> None:
        self.clock = clock
        self.acting: FakeRunner | None = acting
        self.shadow = shadow
        self.shadow_on = shadow_on

    def take_new(self) -> FakeRunner | None:
        runner, self.acting = self.acting, None
        return runner

    @property
    def shadow_runner(self) -> FakeRunner | None:
        return self.shadow if self.shadow_on(self.clock.now()) else None


def run_shadow_loop(
    shadow: FakeRunner,
    shadow_on: Callable[[float], bool],
    stop_at: float = 2.0,
    takes_over: Callable[[float], bool] = lambda t: False,
    shadow_inference: Inference | None = None,
) -> tuple[ControlLoop, list[DecodedChunk], list[str]]:
    stop = threading.Event()
    clock = FakeClock(stop, stop_at)
    uplink = FakeUplink()
    faults: list[str] = []
    loop = ControlLoop(
        ActorConfig(
            cell_id="cell-01",
            learner_address="127.0.0.1:1",
            control_hz=HZ,
            chunk_steps=5,
            max_episode_s=1.0,
        ),
        FakeHardware(clock),
        FakeScene(clock, {}),
        FakeOperator(clock, takes_over),
        clock,
        uplink,
        ShadowWatcher(clock, FakeRunner(1), shadow, shadow_on),
        on_fault=faults.append,
        inference=InlineInference(),
        shadow_inference=shadow_inference or InlineInference(),
    )
    loop.run(stop)
    return loop, [decode_chunk(c, known_tasks=FakeScene.tasks) for c in uplink.chunks], faults


def test_loop_logs_shadow_actions_aligned_by_tick_and_never_executes_them() -> None:
    # The shadow runs from t = 0.5 s; during 1.2..1.4 s an operator drives.
    loop, chunks, faults = run_shadow_loop(
        FakeRunner(7), lambda t: t >= 0.5 - 1e-9, takes_over=lambda t: 1.2 <= t < 1.4
    )
    assert not faults
    assert all((c.action[:, 0] != 7).all() for c in chunks)  # never executed
    shadowed = [c for c in chunks if c.shadow_action is not None]
    assert shadowed and all(c.shadow_version == "v7" for c in shadowed)
    for c in shadowed:
        assert (c.shadow_action[:, 0] == 7).all()
        assert c.timestamp[0] >= 0.5 - 1e-9
    # Aligned like the acting plan: in the second episode both plans start on its first tick,
    # so until the operator takes over, each step's shadow target has the same place in its
    # (blended) chunk as the executed one (column 1 holds the index within a chunk).
    same_start = [
        (c.shadow_action[i, 1], c.action[i, 1])
        for c in shadowed
        for i in range(c.n_steps)
        if 1.0 - 1e-9 <= c.timestamp[i] < 1.2 - 1e-9
    ]
    assert len(same_start) >= 3
    np.testing.assert_allclose(*zip(*same_start, strict=True))
    # It keeps running while the operator drives: those steps are compared with the operator.
    assert sum(int(c.intervention.sum()) for c in shadowed) >= 3
    # Chunks from before the shadow started carry none.
    assert all(c.shadow_action is None for c in chunks if c.timestamp[-1] < 0.5 - 1e-9)
    stats = loop.stats
    assert stats["shadow_errors"] == 0 and stats["shadow_steps"] == sum(c.n_steps for c in shadowed)


def test_a_failing_shadow_is_reported_once_and_acting_runs_on() -> None:
    loop, chunks, faults = run_shadow_loop(FakeRunner(7, fail=True), lambda t: True)
    assert len(faults) == 1 and "shadow version v7" in faults[0]
    assert loop.stats["shadow_errors"] == 1 and loop.stats["policy_errors"] == 0
    assert not any(c.shadow_action is not None for c in chunks)
    assert all(c.policy_version == "v1" for c in chunks if not c.intervention.any())
    assert sum(c.n_steps for c in chunks) == loop.stats["steps_recorded"] > 0


class SlowRunner(FakeRunner):
    def predict(
        self, frames: Mapping[str, np.ndarray], joint_pos: np.ndarray, task: str
    ) -> np.ndarray:
        time.sleep(1.0)
        return super().predict(frames, joint_pos, task)


def test_a_slow_shadow_leaves_its_steps_without_shadow_actions_and_never_holds_the_loop() -> None:
    """Virtual time runs 40 ticks in milliseconds while the shadow's one inference takes a
    second on its own worker: no tick waits for it, acting runs as usual, and every step
    goes up without a shadow action (none is invented)."""
    t0 = time.monotonic()
    loop, chunks, faults = run_shadow_loop(
        SlowRunner(7), lambda t: True, shadow_inference=ThreadedInference("cell-01", nice=5)
    )
    assert not faults
    stats = loop.stats
    assert stats["steps_recorded"] == sum(c.n_steps for c in chunks) > 0
    assert all(c.shadow_action is None for c in chunks)
    assert stats["shadow_steps"] == 0 and stats["shadow_calls"] == 1
    assert stats["shadow_steps_missing"] == stats["steps_recorded"]
    assert stats["policy_calls"] > 1 and stats["policy_errors"] == 0
    assert all(c.policy_version == "v1" for c in chunks)
    assert time.monotonic() - t0 < 5.0


def test_recorder_sends_shadow_actions_only_for_fully_covered_chunks() -> None:
    recorder = EpisodeRecorder("cell-01", "ep", TASK, 3, 80)
    frame = {"overhead": Frame("overhead", np.zeros((8, 8, 3), np.uint8), 0.0)}
    plan: list[tuple[np.ndarray | None, str]] = [
        (np.full(14, 1.0), "v2"),
        (np.full(14, 2.0), "v2"),
        (np.full(14, 3.0), "v2"),  # full
        (np.full(14, 4.0), "v2"),
        (None, ""),
        (np.full(14, 5.0), "v2"),  # one step missing
        (np.full(14, 6.0), "v2"),
        (np.full(14, 7.0), "v3"),
        (np.full(14, 8.0), "v3"),  # mixed
        (np.full(14, np.nan), "v3"),  # non-finite: dropped, never sent
    ]
    out = []
    for i, (shadow, version) in enumerate(plan):
        chunk = recorder.add_step(
            stamp=float(i),
            joint_pos=np.zeros(14),
            action=np.zeros(14),
            intervention=False,
            reward=0.0,
            frames=frame,
            policy_version="v1",
            shadow_action=shadow,
            shadow_version=version,
        )
        if chunk is not None:
            out.append(chunk)
    out.append(recorder.finish(success=False, reason="timeout", started_at=0.0, ended_at=9.0))
    decoded = [decode_chunk(c, known_tasks=[TASK]) for c in out]
    assert [c.n_steps for c in decoded] == [3, 3, 3, 1]
    first = decoded[0]
    assert first.shadow_version == "v2" and first.shadow_action is not None
    np.testing.assert_array_equal(first.shadow_action[:, 0], [1.0, 2.0, 3.0])
    assert all(c.shadow_action is None and c.shadow_version == "" for c in decoded[1:])
    assert recorder.shadow_chunks == 1

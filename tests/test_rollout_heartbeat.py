"""What a cell's heartbeat says about a rollout: the version it runs in shadow, and its
faults, where a recovered cell stops showing its last fault after a fault-free while but
keeps counting it. End to end with the real edge actor (run_actor, a sim cell) against the
learner's real ingest and policy services; smaller tests pin the fault rule and the
metrics."""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from actors import edge
from actors.config import ActorConfig
from actors.edge import FaultLog, run_actor
from drivers.sim import make_sim_cell
from fleet.common import metrics, signing
from fleet.common.policy.config import policy_config
from fleet.common.policy.model import UnifiedPolicy
from fleet.control import rollout
from fleet.control.registry import CellState, Registry
from learner import ingest, policy_service
from learner.ingest import IngestServicer
from learner.policy_service import PolicyServicer
from learner.publisher import Publisher
from learner.store import EpisodeStore
from protos.fleetlearn.v1 import policy_pb2, policy_pb2_grpc
from tests.waiting import wait_for

TASK = "pick_cube"
CAMERAS = ("overhead",)
CELL = "cell-hb"


def test_a_fault_clears_after_a_fault_free_while_and_stays_counted() -> None:
    now = [100.0]
    faults = FaultLog(clear_after_s=60.0, clock=lambda: now[0])
    assert (faults.current(), faults.count) == ("", 0)
    faults.report("camera front timed out")
    now[0] += 59.0
    assert faults.current() == "camera front timed out"
    faults.report("uplink unavailable")  # a new fault restarts the fault-free time
    now[0] += 59.0
    assert faults.current() == "uplink unavailable"
    now[0] += 1.0
    assert faults.current() == "" and faults.count == 2
    assert faults.last == "uplink unavailable"  # the run's summary keeps the newest ever


def test_edge_metrics_export_the_shadow_counters() -> None:
    stats = {"shadow_calls": 7, "shadow_steps": 120, "shadow_steps_missing": 3, "shadow_errors": 0}
    registry = CollectorRegistry()
    metrics.register(
        metrics.StatsCollector(lambda: stats, metrics.EDGE_STATS, labels={"cell": CELL}),
        registry,
    )
    text = generate_latest(registry).decode()
    for name, value in (
        ("fleet_edge_shadow_calls_total", 7.0),
        ("fleet_edge_shadow_steps_total", 120.0),
        ("fleet_edge_shadow_steps_missing_total", 3.0),
        ("fleet_edge_shadow_errors_total", 0.0),
    ):
        assert f'{name}{{cell="{CELL}"}} {value}' in text


def test_heartbeat_carries_shadow_version_and_fault_count_into_the_registry(
    registry: Registry,
) -> None:
    servicer = PolicyServicer(registry)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    policy_service.add_to_server(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            policy_pb2_grpc.PolicyServiceStub(channel).ReportHeartbeat(
                policy_pb2.Heartbeat(
                    cell_id=CELL, version_running="v1", shadow_version="v2", fault_count=4
                ),
                timeout=5,
            )
    finally:
        servicer.stop()
        server.stop(0).wait(5)
    (cell,) = registry.cells()
    assert (cell.version_running, cell.shadow_version, cell.counters.fault_count) == ("v1", "v2", 4)
    assert cell.last_fault == ""
    # A heartbeat stored before these fields existed reads back with their defaults.
    registry.r.hdel(registry._k("cell", CELL), "shadow_version", "fault_count")
    (old,) = registry.cells()
    assert (old.shadow_version, old.counters.fault_count) == ("", 0)
    assert CellState(cell_id="x").shadow_version == ""


def test_the_edge_actor_reports_its_shadow_and_clears_a_recovered_fault(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge, "FAULT_CLEAR_S", 1.5)  # the rule, on a test's time scale
    store = EpisodeStore(tmp_path / "store")
    policy = PolicyServicer(registry, poll_interval_s=0.05)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    ingest.add_to_server(server, IngestServicer(store, known_tasks=[TASK]))
    policy_service.add_to_server(server, policy)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    private, public = signing.write_key_pair(tmp_path / "keys")
    forged, _ = signing.write_key_pair(tmp_path / "forged")
    torch.manual_seed(0)
    model = UnifiedPolicy(policy_config("tiny", [TASK], CAMERAS, chunk_len=20))
    good = Publisher(registry, tmp_path / "v", rollout_mode="auto", signing_key=private)
    bad = Publisher(registry, tmp_path / "v", rollout_mode="auto", signing_key=forged)
    stable = good.publish(model, training_step=1, data_seen=1).version_id
    shadow = good.publish(model, training_step=2, data_seen=2).version_id
    unverifiable = bad.publish(model, training_step=3, data_seen=3).version_id
    registry.set_stable(stable, actor="test", reason="the fleet's version")

    cell = make_sim_cell(CELL, seed=1, cameras=CAMERAS, height=48, width=64, realtime_factor=0.0)
    config = ActorConfig(
        cell_id=CELL,
        learner_address=f"127.0.0.1:{port}",
        tasks=(TASK,),
        chunk_steps=10,
        max_episode_s=3.0,
        heartbeat_interval_s=0.1,
        rpc_deadline_s=5.0,
        verify_key=str(public),
    )
    stop = threading.Event()
    summary: dict = {}

    def actor() -> None:
        summary.update(run_actor(config, cell, stop, drain_timeout_s=20.0))

    def state() -> CellState:
        """The cell as its last heartbeat described it (an empty one before any)."""
        return next((c for c in registry.cells() if c.cell_id == CELL), CellState(CELL))

    thread = threading.Thread(target=actor, name="actor")
    thread.start()
    try:
        wait_for(lambda: state().version_running == stable, 20, "stable running")
        assert state().shadow_version == ""

        rollout.start_shadow(registry, shadow, [CELL], actor="test", reason="shadow")
        wait_for(lambda: state().shadow_version == shadow, 15, "the shadow in the heartbeat")
        rollout.rollback(registry, actor="test", reason="shadow run over")
        wait_for(lambda: state().shadow_version == "", 10, "the shadow to leave the heartbeat")
        assert state().version_running == stable

        # A shadow that fails its signature check is a fault; the cell runs on without it.
        rollout.start_shadow(registry, unverifiable, [CELL], actor="test", reason="forged")
        wait_for(lambda: unverifiable in state().last_fault, 15, "the fault in the heartbeat")
        counted = state().counters.fault_count
        assert counted >= 1 and state().shadow_version == ""
        wait_for(lambda: state().last_fault == "", 10, "the fault to clear when fault-free")
        assert state().counters.fault_count == counted
        assert state().version_running == stable
    finally:
        stop.set()
        thread.join(60)
        policy.stop()
        server.stop(0).wait(5)
    assert summary["flushed"] and summary["faults"] == counted
    assert unverifiable in summary["last_fault"]  # the run's summary keeps it

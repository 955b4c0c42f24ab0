"""The Redis registry and the private redis-server, against a real redis-server."""

from __future__ import annotations

import json
import time

import pytest
import redis

from fleet.common.cell_counters import CellCounters
from fleet.common.registry_records import OutcomeCounts, StoreTotals
from fleet.control.redis_server import RedisServer, RedisServerError
from fleet.control.registry import CellState, Registry


def manifest(version_id: str, **extra: object) -> str:
    return json.dumps(
        {"version_id": version_id, "parent": None, "sha256": "ab" * 32, "created_at": 1.0, **extra}
    )


def test_versions_add_list_latest(registry: Registry) -> None:
    assert registry.versions() == []
    assert registry.latest_version() is None
    registry.add_version(manifest("v0002"), "/w/v0002.safetensors", published_at=200.0)
    registry.add_version(manifest("v0001"), "/w/v0001.safetensors", published_at=100.0)

    assert [v.version_id for v in registry.versions()] == ["v0001", "v0002"]
    assert registry.latest_version() == "v0002"
    record = registry.version("v0001")
    assert record is not None
    assert record.weights_path == "/w/v0001.safetensors"
    assert record.published_at == 100.0
    assert record.manifest["sha256"] == "ab" * 32
    assert registry.version("nope") is None


def test_versions_are_immutable(registry: Registry) -> None:
    registry.add_version(manifest("v0001"), "/w/a", published_at=1.0)
    registry.add_version(manifest("v0001"), "/w/a", published_at=5.0)  # identical: no-op
    assert registry.version("v0001").published_at == 1.0
    with pytest.raises(ValueError, match="already registered"):
        registry.add_version(manifest("v0001", training_step=9), "/w/b")
    with pytest.raises(ValueError, match="version_id"):
        registry.add_version(json.dumps({"sha256": "x"}), "/w/c")


def test_rollout_stable_is_every_cells_assignment_and_is_logged(registry: Registry) -> None:
    registry.set_rollout_mode("immediate")
    rollout = registry.rollout()
    assert (rollout.mode, rollout.stable, rollout.candidate) == ("immediate", None, None)
    assert registry.assignment_for("cell-a") is None
    with pytest.raises(KeyError):
        registry.set_stable("v9", actor="test", reason="no such version")
    with pytest.raises(ValueError, match="rollout mode"):
        registry.set_rollout_mode("yolo")

    registry.add_version(manifest("v0001"), "/w/1")
    registry.set_stable("v0001", actor="publisher", reason="newest")
    assert registry.rollout().stable == "v0001"
    assert registry.assignments(["cell-a", "cell-b"]) == {"cell-a": "v0001", "cell-b": "v0001"}

    (event,) = registry.events()
    assert event.kind == "set_stable"
    assert event.actor == "publisher"
    assert event.fields["version"] == "v0001"
    assert event.fields["previous"] == ""


def test_heartbeat_ttl_marks_cell_dead(redis_server: str) -> None:
    reg = Registry(redis_server, prefix="test:ttl:", heartbeat_ttl_s=0.2)
    state = CellState(
        cell_id="cell-1",
        counters=CellCounters(
            episodes=3,
            steps_recorded=900,
            steps_acked=850,
            loop_hz=49.5,
            late_ticks=2,
            successes=1,
            interventions=7,
        ),
        version_running="v0001",
        task="fold",
        versions_adopted=[{"version": "v0001", "adopted_at": 12.5}],
        last_seen=time.time(),
    )
    reg.record_heartbeat(state)
    (seen,) = reg.cells()
    assert seen.alive
    assert seen == CellState(**{**state.__dict__, "alive": True})

    time.sleep(0.35)
    (seen,) = reg.cells()
    assert not seen.alive
    assert seen.counters.steps_acked == 850  # the last state stays for the dashboard

    reg.record_heartbeat(state)
    assert reg.cells()[0].alive
    reg.close()


def test_success_counts(registry: Registry) -> None:
    for success, steps, interventions in ((True, 100, 0), (False, 120, 30), (True, 90, 5)):
        registry.record_episode(
            cell_id="c1",
            version="v0001",
            task="fold",
            success=success,
            steps=steps,
            intervention_steps=interventions,
        )
    registry.record_episode(
        cell_id="c2", version="v0002", task="pour", success=False, steps=10, intervention_steps=0
    )
    # An episode an operator took over is not an autonomous success (rollout decisions).
    assert registry.success_counts() == {
        "v0001": {
            "fold": OutcomeCounts(
                episodes=3,
                successes=2,
                intervention_steps=35,
                steps=310,
                intervened_episodes=2,
                autonomous_successes=1,
                takeovers=2,  # not given: one per episode with an intervention
                duration_ms=0,
                demonstrations=0,
            )
        },
        "v0002": {
            "pour": OutcomeCounts(
                episodes=1,
                successes=0,
                intervention_steps=0,
                steps=10,
                intervened_episodes=0,
                autonomous_successes=0,
                takeovers=0,
                duration_ms=0,
                demonstrations=0,
            )
        },
    }


def test_events_append_and_read(registry: Registry) -> None:
    ids = [
        registry.log_event("promote", actor="alice", reason=f"step {i}", version="v1", step=i)
        for i in range(5)
    ]
    assert ids == sorted(ids)
    events = registry.events()
    assert [e.id for e in events] == ids
    assert events[0].kind == "promote"
    assert events[0].actor == "alice"
    assert events[2].reason == "step 2"
    assert events[2].fields["step"] == "2"
    assert isinstance(events[0].ts, float)
    newest_two = [e.fields["step"] for e in registry.events(count=2)]
    assert newest_two == ["3", "4"]  # newest two, in order
    with pytest.raises(ValueError, match="reserved"):
        registry.log_event("x", actor="a", reason="r", ts=1)


def test_learner_stats_and_store_totals(registry: Registry) -> None:
    registry.set_learner_stats(state="training", updates=12, loss=0.25, port=50051)
    registry.set_learner_stats(updates=13, port=None)  # None removes a stat
    assert registry.learner_stats() == {"state": "training", "updates": 13, "loss": 0.25}
    assert registry.store_totals() == StoreTotals(steps=0, episodes=0)
    registry.add_store_totals(100, 1)
    registry.add_store_totals(50, 0)
    assert registry.store_totals() == StoreTotals(steps=150, episodes=1)


def test_password_protected_server() -> None:
    with RedisServer(password='s3cret "pass"') as server:
        assert ":s3cret%20%22pass%22@" in server.url
        good = Registry(server.url)
        assert good.ping()
        good.add_version(manifest("v1"), "/w/1")
        assert good.latest_version() == "v1"
        good.close()

        anonymous = Registry(server.url.replace(server.url.split("@")[0] + "@", "redis://"))
        assert not anonymous.ping()
        with pytest.raises(redis.AuthenticationError):
            anonymous.latest_version()
        anonymous.close()
    assert not server.running
    server.stop()  # idempotent


def test_redis_server_errors_are_clear() -> None:
    with pytest.raises(RedisServerError, match="apt-get install redis-server"):
        RedisServer(binary="no-such-redis-server-binary").start()
    with RedisServer() as first:
        taken = RedisServer(port=first.port)
        with pytest.raises(RedisServerError, match="exited"):
            taken.start(timeout_s=5)
        assert not taken.running

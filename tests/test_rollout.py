"""Staged rollout: assignments follow pin > candidate > stable, every action is logged with
who and why, the `fleet` rollout commands work against a real Redis, and the automatic
controller walks a good version to the fleet and rolls a bad one back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fleet.common.registry_records import ShadowScore
from fleet.control import rollout
from fleet.control.registry import CellState, Registry
from fleet.control.rollout import RuleConfig
from learner.rollout_controller import ControllerConfig, RolloutController

CELLS = ("cell-0", "cell-1", "cell-2", "cell-3")


def manifest(version_id: str) -> str:
    return json.dumps({"version_id": version_id, "sha256": "ab" * 32, "training_step": 1})


def fleet_of_cells(registry: Registry, *versions: str) -> None:
    for i, v in enumerate(versions):
        registry.add_version(manifest(v), f"/w/{v}", published_at=float(i + 1))
    for cell_id in CELLS:
        registry.record_heartbeat(CellState(cell_id=cell_id, last_seen=time.time()))


def episodes(
    registry: Registry, version: str, n: int, successes: int, *, cell: str = "cell-0"
) -> None:
    for i in range(n):
        registry.record_episode(
            cell_id=cell,
            version=version,
            task="pick",
            success=i < successes,
            steps=10,
            intervention_steps=0,
        )


def test_assignments_pin_beats_candidate_beats_stable(registry: Registry) -> None:
    fleet_of_cells(registry, "v1", "v2", "v3")
    registry.set_stable("v1", actor="test", reason="base")
    canary = rollout.start_rollout(registry, "v2", ["cell-1"], actor="alice", reason="try v2")
    assert canary == ["cell-1"]
    rollout.pin(registry, "cell-2", "v3", actor="bob")
    assert registry.assignments(CELLS) == {
        "cell-0": "v1",
        "cell-1": "v2",
        "cell-2": "v3",
        "cell-3": "v1",
    }
    state = registry.rollout()
    assert (state.candidate, state.stage, state.canary_cells) == (
        "v2",
        "canary",
        ["cell-1"],
    )
    with pytest.raises(RuntimeError, match="already rolling out"):
        rollout.start_rollout(registry, "v3", 1, actor="alice", reason="again")

    rollout.unpin(registry, "cell-2", actor="bob")
    with pytest.raises(KeyError):
        rollout.unpin(registry, "cell-2", actor="bob")
    assert rollout.rollback(registry, actor="alice", reason="looks off") == "v2"
    assert set(registry.assignments(CELLS).values()) == {"v1"}
    assert "v2" in registry.rolled_back()

    rollout.start_rollout(registry, "v3", 2, actor="alice", reason="try v3")
    assert rollout.promote(registry, actor="alice", reason="good") == "v3"
    assert registry.rollout().stable == "v3"
    assert set(registry.assignments(CELLS).values()) == {"v3"}
    assert rollout.rollback(registry, actor="alice", reason="nothing") is None

    kinds = [(e.kind, e.actor, e.reason) for e in registry.events()]
    assert ("rollout_start", "alice", "try v2") in kinds
    assert ("pin", "bob", "pinned to v3") in kinds
    assert ("rollback", "alice", "looks off") in kinds
    assert ("promote", "alice", "good") in kinds


def test_shadow_candidate_never_acts(registry: Registry) -> None:
    fleet_of_cells(registry, "v1", "v2")
    registry.set_stable("v1", actor="test", reason="base")
    rollout.start_shadow(registry, "v2", ["cell-0"], actor="alice", reason="shadow first")
    assert set(registry.assignments(CELLS).values()) == {"v1"}
    assert registry.shadow_assignments(["cell-0", "cell-1"]) == {"cell-0": "v2", "cell-1": None}
    registry.record_shadow(
        version="v2", steps=10, dist_stable_sum=2.0, operator_steps=4, dist_operator_sum=2.0
    )
    assert registry.shadow_scores()["v2"] == ShadowScore(
        steps=10,
        operator_steps=4,
        mean_dist_stable=0.2,
        mean_dist_operator=0.5,
    )


def controller(registry: Registry) -> RolloutController:
    return RolloutController(
        registry,
        ControllerConfig(canary=1, fraction=0.5, rule=RuleConfig(min_episodes=30, margin=0.1)),
    )


def test_controller_promotes_a_good_version_through_every_stage(registry: Registry) -> None:
    fleet_of_cells(registry, "v1")
    registry.set_rollout_mode("auto")
    ctl = controller(registry)
    assert ctl.step() == "bootstrap"
    assert registry.rollout().stable == "v1"
    episodes(registry, "v1", 400, 300)
    registry.add_version(manifest("v2"), "/w/v2", published_at=10.0)
    assert ctl.step() == "start"
    assert registry.rollout().candidate_cells == ["cell-0"]
    assert ctl.step() == "wait"
    episodes(registry, "v2", 300, 240)
    assert ctl.step() == "advance"
    assert registry.rollout().stage == "fraction"
    assert len(registry.rollout().candidate_cells) == 2
    assert ctl.step() == "wait"  # the fraction stage needs its own episodes
    episodes(registry, "v2", 100, 80)
    assert ctl.step() == "promote"
    assert registry.rollout().stable == "v2"
    promoted = [e for e in registry.events() if e.kind == "promote"][-1]
    assert promoted.actor == "rollout-controller"
    assert float(promoted.fields["p_not_worse"]) > 0.95


def test_controller_rolls_back_a_credibly_worse_version(registry: Registry) -> None:
    fleet_of_cells(registry, "v1")
    registry.set_rollout_mode("auto")
    registry.set_stable("v1", actor="test", reason="base")
    episodes(registry, "v1", 100, 80)
    registry.add_version(manifest("v2"), "/w/v2", published_at=10.0)
    ctl = controller(registry)
    assert ctl.step() == "start"
    episodes(registry, "v2", 15, 0)
    assert ctl.step() == "rollback"
    assert registry.rollout().candidate is None
    assert ctl.step() is None  # a rolled-back version is never proposed again
    (event,) = [e for e in registry.events() if e.kind == "rollback"]
    assert "credibly worse" in event.reason and event.fields["version"] == "v2"
    assert "cand 0/15" in event.fields["task.pick"]


def test_immediate_mode_leaves_the_rollout_alone(registry: Registry) -> None:
    fleet_of_cells(registry, "v1")
    registry.set_rollout_mode("immediate")
    assert controller(registry).step() is None
    assert registry.rollout().stable is None


# -- the `fleet` commands against a real Redis -----------------------------------------


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250"},
    )


@pytest.mark.parametrize(
    "command", ["versions", "rollout", "promote", "rollback", "pin", "unpin", "events"]
)
def test_rollout_commands_have_help(command: str) -> None:
    out = fleet(command, "--help")
    assert out.returncode == 0, out.stderr
    assert f"fleet {command}" in out.stdout and "--redis-url" in out.stdout


def test_rollout_commands_against_redis(redis_server: str) -> None:
    url = redis_server.rsplit("/", 1)[0] + "/3"  # a database of its own (default prefix)
    registry = Registry(url)
    registry.r.flushdb()
    fleet_of_cells(registry, "v1", "v2")
    registry.set_stable("v1", actor="test", reason="base")

    out = fleet("rollout", "v2", "--canary", "cell-1,cell-3", "--redis-url", url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert registry.assignments(CELLS)["cell-3"] == "v2"
    out = fleet("versions", "--redis-url", url)
    assert "candidate" in out.stdout and "stable" in out.stdout
    assert fleet("pin", "cell-0", "v2", "--redis-url", url).returncode == 0
    assert registry.pins() == {"cell-0": "v2"}
    assert fleet("unpin", "cell-0", "--redis-url", url).returncode == 0
    out = fleet("promote", "--redis-url", url, "--reason", "canary looks good")
    assert out.returncode == 0 and "v2" in out.stdout
    assert registry.rollout().stable == "v2"
    out = fleet("pin", "cell-0", "v9", "--redis-url", url)
    assert out.returncode == 1 and "refused" in out.stdout
    assert fleet("rollback", "--redis-url", url).returncode == 0
    out = fleet("events", "--redis-url", url)
    assert out.returncode == 0
    for kind in ("rollout_start", "pin", "unpin", "promote", "rollback_noop"):
        assert kind in out.stdout
    assert "canary looks good" in out.stdout
    registry.r.flushdb()
    registry.close()


def test_shadow_actions_are_scored_against_stable_and_operator() -> None:
    import numpy as np

    from fleet.common.wire import to_tensor
    from learner.chunks import decode_chunk
    from learner.shadow_scoring import shadow_score
    from protos.fleetlearn.v1 import trajectory_pb2

    n = 4
    action = np.zeros((n, 14), np.float32)
    shadow = np.full((n, 14), 0.5, np.float32)
    shadow[3] = 2.0
    msg = trajectory_pb2.StepChunk(
        cell_id="cell-0",
        episode_id="ep-1",
        seq=0,
        first_step=0,
        task="pick",
        policy_version="v1",
        timestamp=to_tensor(np.arange(n, dtype=np.float64)),
        joint_pos=to_tensor(np.zeros((n, 14), np.float32)),
        action=to_tensor(action),
        intervention=to_tensor(np.array([False, False, True, True])),
        reward=to_tensor(np.zeros(n, np.float32)),
    )
    assert shadow_score(decode_chunk(msg, known_tasks=None)) is None
    msg.shadow_action.CopyFrom(to_tensor(shadow))
    msg.shadow_version = "v2"
    score = shadow_score(decode_chunk(msg, known_tasks=None))
    assert score is not None and score.version == "v2"
    assert (score.steps, score.operator_steps) == (2, 2)
    assert score.dist_stable_sum == pytest.approx(1.0)
    assert score.dist_operator_sum == pytest.approx(2.5)

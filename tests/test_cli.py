"""The `fleet` command: every subcommand has --help, and `fleet status` shows Redis' live state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.common.cell_counters import CellCounters
from fleet.control.registry import CellState, Registry


def fleet(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "220"},
    )


@pytest.mark.parametrize("command", ["up", "status", "learner", "actor", "calibrate", "eval"])
def test_every_command_has_help(command: str) -> None:
    out = fleet(command, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and f"fleet {command}" in out.stdout


def test_status_prints_the_live_state_from_redis(redis_server: str) -> None:
    registry = Registry(redis_server)
    registry.add_version(
        json.dumps(
            {
                "version_id": "v0001",
                "sha256": "ab" * 32,
                "created_at": time.time(),
                "parent": None,
                "model_config": {},
                "training_step": 10,
                "data_seen": 100,
            }
        ),
        "/nonexistent/v0001.safetensors",
    )
    registry.set_rollout_mode("immediate")
    registry.set_stable("v0001", actor="test", reason="first")
    registry.record_heartbeat(
        CellState(
            cell_id="cell-77",
            counters=CellCounters(
                episodes=4,
                steps_recorded=640,
                steps_acked=640,
                loop_hz=20.0,
                late_ticks=0,
                successes=3,
                interventions=12,
            ),
            version_running="v0001",
            task="pick_cube",
            last_fault="",
            versions_adopted=[],
            last_seen=time.time(),
            alive=True,
        )
    )
    registry.record_episode(
        cell_id="cell-77",
        version="v0001",
        task="pick_cube",
        success=True,
        steps=160,
        intervention_steps=0,
    )
    registry.set_learner_stats(state="ready", updates=42, loss=0.125)
    out = fleet("status", "--redis-url", redis_server)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "cell-77" in text and "v0001" in text and "75% (3/4)" in text
    assert "42" in text and "0.1250" in text and "pick_cube" in text


def test_fleet_up_names_the_tasks_each_sim_backend_has() -> None:
    """fleet/ repeats the sim tasks (it imports no drivers): the learner it starts must know
    exactly the tasks the cells will run, or every upload would be rejected."""
    from drivers.sim.mujoco.tasks import MUJOCO_TASKS
    from drivers.sim.tasks import SIM_TASKS as KINEMATIC_TASKS
    from fleet.control.up import SIM_TASKS

    assert SIM_TASKS == {"mujoco": MUJOCO_TASKS, "kinematic": KINEMATIC_TASKS}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--preset", "huge"], "unknown policy preset 'huge'"),
        (["--policy-set", "chunk_len=-1"], "chunk_len must be >= 1"),
        (["--policy-set", "huber_beta=-0.5"], "huber_beta must be a finite number >= 0"),
        (["--task-weight", "juggle=2"], "--task-weight names ['juggle']"),
        (["--task-weight", "a=-1"], "want TASK=WEIGHT with WEIGHT a number >= 0"),
    ],
)
def test_learner_refuses_a_model_it_cannot_build_before_starting(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    """A preset or setting that builds no model is a usage error at once, not a trainer that
    fails after Ray, the gateway and the store have started."""
    out = fleet(
        "learner",
        "--data-dir",
        str(tmp_path),
        "--tasks",
        "a",
        "--cameras",
        "c",
        "--insecure",
        *flags,
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert not (tmp_path / "store").exists()

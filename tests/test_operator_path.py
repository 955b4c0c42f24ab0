"""The operator's path: in `--rollout manual` versions are registered and nothing moves until
an operator acts; `fleet up`'s connection file (owner-only) lets `fleet status` and the
rollout commands reach a running fleet with `--run DIR`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import torch

from fleet.common.policy.config import policy_config
from fleet.common.policy.model import UnifiedPolicy
from fleet.control.connection import read_connection, write_connection
from fleet.control.redis_server import RedisServer
from fleet.control.registry import CellState, Registry
from fleet.control.rollout import RuleConfig
from learner.publisher import Publisher
from learner.rollout_controller import ControllerConfig, RolloutController


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "250"},
    )


def test_manual_mode_registers_versions_and_moves_nothing(
    registry: Registry, tmp_path: Path
) -> None:
    registry.set_rollout_mode("manual")
    for cell in ("cell-01", "cell-02"):
        registry.record_heartbeat(CellState(cell_id=cell, last_seen=time.time()))
    publisher = Publisher(registry, tmp_path / "versions", rollout_mode="manual")
    controller = RolloutController(
        registry, ControllerConfig(canary=1, rule=RuleConfig(min_episodes=1))
    )
    torch.manual_seed(0)
    model = UnifiedPolicy(policy_config("tiny", ["pick_cube"], ("overhead",)))
    first = publisher.publish(model, training_step=10, data_seen=100).version_id
    second = publisher.publish(model, training_step=20, data_seen=200).version_id
    for _ in range(3):
        assert controller.step() is None  # no bootstrap, no canary: the operator decides
    state = registry.rollout()
    assert [v.version_id for v in registry.versions()] == [first, second]
    assert (state.mode, state.stable, state.candidate) == ("manual", None, None)
    assert registry.assignments(["cell-01", "cell-02"]) == {"cell-01": None, "cell-02": None}
    assert registry.event_counts() == {}

    # The operator starts a canary by hand and promotes it; the controller still stays out.
    from fleet.control import rollout

    rollout.start_rollout(registry, second, ["cell-02"], actor="alice", reason="try it")
    assert controller.step() is None
    assert registry.assignments(["cell-01", "cell-02"])["cell-02"] == second
    rollout.promote(registry, actor="alice", reason="looks good")
    assert registry.rollout().stable == second


def test_learner_and_fleet_up_offer_manual_rollout() -> None:
    for command in ("up", "learner"):
        out = fleet(command, "--help")
        assert out.returncode == 0, out.stderr
        assert "manual" in out.stdout, f"fleet {command} --help does not offer manual"


def test_connection_file_is_owner_only_and_status_reads_it(tmp_path: Path) -> None:
    with RedisServer(password="s3cret-pw") as server:
        reg = Registry(server.url)
        reg.record_heartbeat(CellState(cell_id="cell-42", task="pick_cube", last_seen=time.time()))
        reg.set_rollout_mode("manual")
        reg.close()
        path = write_connection(tmp_path, redis_url=server.url, operator_token="tok")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert read_connection(tmp_path)["redis_url"] == server.url

        out = fleet("status", "--run", str(tmp_path))
        assert out.returncode == 0, out.stderr
        assert "cell-42" in out.stdout and "manual" in out.stdout
        out = fleet("events", "--run", str(path))  # the file itself works too
        assert out.returncode == 0, out.stderr

        path.chmod(0o644)  # a password others can read is refused, with the fix named
        out = fleet("status", "--run", str(tmp_path))
        assert out.returncode == 2 and "chmod 600" in out.stderr
    out = fleet("status", "--run", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "run directory" in out.stderr


def test_status_needs_a_redis_url_or_a_run_dir() -> None:
    out = fleet("status")
    assert out.returncode == 2 and "--redis-url" in out.stderr and "--run" in out.stderr


def test_rewriting_the_connection_file_keeps_it_private(tmp_path: Path) -> None:
    write_connection(tmp_path, redis_url="redis://:a@127.0.0.1:1/0")
    (tmp_path / "connection.json").chmod(0o644)
    path = write_connection(tmp_path, redis_url="redis://:b@127.0.0.1:1/0")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["redis_url"].endswith(":1/0")


def test_learner_and_dashboard_take_redis_from_the_environment(monkeypatch, tmp_path) -> None:
    """`fleet up` passes the Redis URL (with its password) through FLEET_REDIS_URL, never
    argv; without either, the commands say how to give one."""
    import pytest

    from fleet.control.connection import REDIS_URL_ENV, redis_url_or_env

    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    with pytest.raises(SystemExit, match=f"--redis-url URL or set {REDIS_URL_ENV}"):
        redis_url_or_env(None)
    monkeypatch.setenv(REDIS_URL_ENV, "redis://:secret@127.0.0.1:1/0")
    assert redis_url_or_env(None) == "redis://:secret@127.0.0.1:1/0"
    assert redis_url_or_env("redis://127.0.0.1:2/0") == "redis://127.0.0.1:2/0"  # a flag wins
    env = {k: v for k, v in os.environ.items() if k != REDIS_URL_ENV}
    learner = ["learner.main", "--data-dir", str(tmp_path), "--tasks", "a", "--cameras", "b"]
    for argv in ([*learner, "--insecure"], ["fleet.cli", "dashboard"]):
        proc = subprocess.run(
            [sys.executable, "-m", *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.returncode != 0 and REDIS_URL_ENV in proc.stderr, (argv, proc.stderr[-500:])

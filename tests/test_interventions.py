"""Interventions as people count them: takeovers (contiguous runs of operator steps) per hour
and per episode, the share of time an operator drove, and operator steps per autonomous
success; the same figures in the registry, the dashboard, `fleet status` and Prometheus."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleet.common import metrics
from fleet.common.cell_counters import CellCounters
from fleet.common.registry_records import OutcomeCounts
from fleet.control.dashboard.app import create_app
from fleet.control.interventions import count_takeovers, figures
from fleet.control.redis_server import RedisServer
from fleet.control.registry import CellState, Registry


def test_takeovers_are_runs_of_intervention_steps() -> None:
    assert count_takeovers(np.array([], bool)) == 0
    assert count_takeovers(np.zeros(50, bool)) == 0
    # 40 ticks of one person holding the leader arms is one takeover, not 40.
    assert count_takeovers(np.r_[np.zeros(10), np.ones(40), np.zeros(10)].astype(bool)) == 1
    assert count_takeovers(np.array([1, 1, 0, 1, 0, 0, 1], bool)) == 3
    # A chunk that opens inside a takeover begun in the previous chunk adds none.
    assert count_takeovers(np.array([1, 1, 0, 1], bool), previous=True) == 1


def _episode(reg: Registry, cell: str, version: str, *, success: bool, flags: list[int]) -> None:
    f = np.array(flags, bool)
    reg.record_episode(
        cell_id=cell,
        version=version,
        task="pick_cube",
        success=success,
        steps=f.size,
        intervention_steps=int(f.sum()),
        takeovers=count_takeovers(f),
        duration_s=f.size / 20.0,  # 20 Hz
    )


def _fill(reg: Registry) -> None:
    """Two cells, one hour of episodes between them at 20 Hz: 3,600 s = 72,000 steps."""
    # cell-01: 6 episodes of 6,000 steps, each with two takeovers of 300 steps.
    takeover = [0] * 2000 + [1] * 300 + [0] * 1000 + [1] * 300 + [0] * 2400
    for _ in range(6):
        _episode(reg, "cell-01", "v0002", success=True, flags=takeover)
    # cell-02: 6 autonomous successes of 6,000 steps.
    for _ in range(6):
        _episode(reg, "cell-02", "v0002", success=True, flags=[0] * 6000)
    reg.record_heartbeat(
        CellState(
            cell_id="cell-01",
            counters=CellCounters(interventions=3600),
            task="pick_cube",
            last_seen=time.time(),
        )
    )
    reg.record_heartbeat(CellState(cell_id="cell-02", task="pick_cube", last_seen=time.time()))


def test_figures_per_version_task_and_cell(registry: Registry) -> None:
    _fill(registry)
    per_task = registry.success_counts()["v0002"]["pick_cube"]
    assert per_task.takeovers == 12 and per_task.intervention_steps == 3600
    assert per_task.duration_ms == 3_600_000
    f = figures(per_task)
    assert f["takeovers_per_hour"] == pytest.approx(12.0)
    assert f["takeovers_per_episode"] == pytest.approx(1.0)
    assert f["intervention_share"] == pytest.approx(3600 / 72_000)
    # 3,600 operator steps bought 6 autonomous successes (cell-02's).
    assert f["human_steps_per_autonomous_success"] == pytest.approx(600.0)
    cells = registry.cell_outcomes()
    one = figures(cells["cell-01"])
    assert one["takeovers_per_hour"] == pytest.approx(12 / 0.5)
    assert one["takeovers_per_episode"] == pytest.approx(2.0)
    assert one["human_steps_per_autonomous_success"] is None  # no autonomous success: unknown
    assert figures(cells["cell-02"])["takeovers_per_hour"] == 0.0
    assert all(v is None for v in figures(OutcomeCounts()).values())


def test_a_demonstration_is_no_takeover(registry: Registry) -> None:
    """With no policy version the operator drives the whole episode: a demonstration, not a
    takeover, and no part of the cell's figures for running policies."""
    _fill(registry)
    _episode(registry, "cell-02", "none", success=True, flags=[1] * 400)
    demo = registry.success_counts()["none"]["pick_cube"]
    assert demo.takeovers == 0 and demo.demonstrations == 1
    assert demo.intervention_steps == 400
    cell = registry.cell_outcomes()["cell-02"]
    assert cell.demonstrations == 1 and cell.episodes == 6 and cell.steps == 36_000
    assert figures(cell)["takeovers_per_hour"] == 0.0


def test_dashboard_shows_takeovers_not_ticks(registry: Registry) -> None:
    _fill(registry)
    with TestClient(create_app(registry, None, sample_interval_s=0.1)) as client:
        cells = {c["cell_id"]: c for c in client.get("/api/fleet").json()["cells"]}
        rollout = client.get("/api/rollout").json()
    one = cells["cell-01"]
    assert one["takeovers"] == 12 and one["takeovers_per_hour"] == pytest.approx(24.0)
    assert one["takeovers_per_episode"] == pytest.approx(2.0)
    assert one["intervention_share"] == pytest.approx(3600 / 36_000)
    assert one["intervention_steps"] == 3600  # the heartbeat's tick counter, named as such
    assert "interventions_per_hour" not in one
    assert cells["cell-02"]["takeovers_per_hour"] == 0.0
    f = rollout["interventions"]["v0002"]["pick_cube"]
    assert f["human_steps_per_autonomous_success"] == pytest.approx(600.0)
    assert rollout["success"]["v0002"]["pick_cube"]["takeovers"] == 12


def test_fleet_status_prints_the_figures() -> None:
    with RedisServer() as server:  # its own: `fleet status` reads the default key prefix
        reg = Registry(server.url)
        _fill(reg)
        reg.close()
        out = subprocess.run(
            [sys.executable, "-m", "fleet.cli", "status", "--redis-url", server.url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "300"},
        )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    (cell_01,) = [ln for ln in lines if "cell-01" in ln and "pick_cube" in ln]
    assert "24.0" in cell_01 and "2.00" in cell_01 and "10.0%" in cell_01
    (per_task,) = [ln for ln in lines if "v0002" in ln and "pick_cube" in ln and "600" in ln]
    assert "12.0" in per_task and "5.0%" in per_task


def test_prometheus_exports_takeovers_and_success_by_version_and_task(
    registry: Registry,
) -> None:
    _fill(registry)
    registry.set_learner_stats(state="ready")
    registry.log_event("rollback", actor="test", reason="worse")
    prom = CollectorRegistry()
    metrics.register(metrics.RegistryCollector(registry), prom)
    samples = {}
    for fam in text_string_to_metric_families(generate_latest(prom).decode()):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    vt = (("task", "pick_cube"), ("version", "v0002"))
    assert samples[("fleet_outcome_takeovers_total", vt)] == 12
    assert samples[("fleet_outcome_autonomous_successes_total", vt)] == 6
    assert samples[("fleet_outcome_successes_total", vt)] == 12
    assert samples[("fleet_outcome_intervention_steps_total", vt)] == 3600
    assert math.isclose(samples[("fleet_outcome_episode_seconds_total", vt)], 3600.0)
    assert samples[("fleet_cell_takeovers_total", (("cell", "cell-01"),))] == 12
    assert samples[("fleet_learner_state", (("state", "ready"),))] == 1
    assert samples[("fleet_learner_state", (("state", "failed"),))] == 0
    assert samples[("fleet_rollout_events_total", (("kind", "rollback"),))] == 1
    assert samples[("fleet_cell_alive", (("cell", "cell-01"),))] == 1

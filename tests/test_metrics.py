"""Prometheus endpoints of a real learner (Ray: gateway + trainer) and a real sim edge actor.

The Grafana dashboard in ops/grafana/ is only useful if every series it queries exists, so
the test scrapes both endpoints after a short run and checks each `fleet_*` name used by
the dashboard's PromQL against what the processes actually export.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fleet.common.metrics import metric_names
from fleet.common.net import free_port
from fleet.control.redis_server import RedisServer
from fleet.control.registry import Registry

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "ops" / "grafana" / "fleet-dashboard.json"
PROMETHEUS = REPO / "ops" / "prometheus" / "prometheus.yml"


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode("utf-8")


def _samples(text: str) -> dict[str, float]:
    """Sample name (labels summed) -> value."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=REPO,
        )


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Run learner + one sim cell until data flowed; yield both endpoints' text."""
    run = tmp_path_factory.mktemp("metrics-run")
    grpc_port, learner_metrics, edge_metrics = free_port(), free_port(), free_port()
    with RedisServer() as redis:
        learner = _spawn(
            [
                "-m",
                "learner.main",
                "--redis-url",
                redis.url,
                "--data-dir",
                str(run),
                "--port",
                str(grpc_port),
                "--tasks",
                "pick_cube,touch_target",
                "--cameras",
                "overhead,front",
                "--min-steps",
                "40",
                "--batch-size",
                "8",
                "--insecure",
                "--metrics-port",
                str(learner_metrics),
                "--metrics-host",
                "127.0.0.1",
            ],
            run / "learner.log",
        )
        edge: subprocess.Popen[bytes] | None = None
        try:
            registry = Registry(redis.url)
            deadline = time.monotonic() + 120
            while registry.learner_stats().get("state") != "ready":
                assert learner.poll() is None, (run / "learner.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "learner not ready in 120 s"
                time.sleep(0.25)
            edge = _spawn(
                [
                    "-m",
                    "actors.main",
                    "--cell",
                    "cell-m1",
                    "--sim",
                    "--sim-backend",  # the light cell: this test is about the metrics
                    "kinematic",
                    "--learner",
                    f"127.0.0.1:{grpc_port}",
                    "--allow-unsigned",
                    "--realtime-factor",
                    "0",
                    "--max-episode-s",
                    "1.5",
                    "--metrics-port",
                    str(edge_metrics),
                    "--metrics-host",
                    "127.0.0.1",
                ],
                run / "edge.log",
            )
            # Wait for: an episode stored and its steps acked at the edge.
            deadline = time.monotonic() + 60
            while True:
                assert edge.poll() is None, (run / "edge.log").read_text()[-3000:]
                try:
                    texts = {"learner": _scrape(learner_metrics), "edge": _scrape(edge_metrics)}
                except OSError:
                    texts = {}
                if texts:
                    lv, ev = _samples(texts["learner"]), _samples(texts["edge"])
                    if (
                        lv.get("fleet_ingest_episodes_completed_total", 0) >= 1
                        and ev.get("fleet_edge_steps_sent_total", 0) > 0
                    ):
                        break
                assert time.monotonic() < deadline, f"no data flowed in 60 s: {texts}"
                time.sleep(1.0)
            yield texts
        finally:
            if edge is not None:
                _stop(edge, 30)
            _stop(learner, 60)


def test_learner_endpoint_exports_ingest_and_trainer_numbers(scraped: dict[str, str]) -> None:
    v = _samples(scraped["learner"])
    assert v["fleet_ingest_steps_stored_total"] > 0
    assert v["fleet_ingest_chunks_acked_total"] >= 1
    # One cell streams: at most its one chunk in flight is counted acked but not yet timed.
    assert v["fleet_ingest_ack_latency_seconds_count"] >= v["fleet_ingest_chunks_acked_total"] - 1
    for name in ("updates_total", "loss", "replay_ratio", "steps_available", "latest_version_info"):
        assert f"fleet_trainer_{name}" in v, name  # the trainer actor's numbers reach the driver
    # Only fleet_* families are re-exposed from the Ray actors (no clashing process_*).
    assert "fleet_edge_steps_sent_total" not in v


def test_edge_endpoint_exports_loop_and_uplink_numbers(scraped: dict[str, str]) -> None:
    v = _samples(scraped["edge"])
    assert v["fleet_edge_tick_lateness_seconds_count"] > 0
    assert v["fleet_edge_steps_recorded_total"] >= v["fleet_edge_steps_sent_total"] > 0
    assert v["fleet_edge_chunks_acked_total"] >= 1
    assert "fleet_edge_running_info" in v
    assert 'cell="cell-m1"' in scraped["edge"]


def test_every_metric_the_grafana_dashboard_queries_exists(scraped: dict[str, str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", []) if "expr" in t
    ]
    assert len(exprs) >= 8
    used = set().union(*(metric_names(e) for e in exprs))
    exported = set().union(*(_samples(t).keys() for t in scraped.values()))
    missing = sorted(used - exported)
    assert not missing, f"the dashboard queries series no process exports: {missing}"


def test_prometheus_config_reads_the_targets_fleet_up_writes(tmp_path: Path) -> None:
    from fleet.control.up import write_prometheus_targets

    path = write_prometheus_targets(tmp_path, {"learner": 9100, "cell-01": 9101})
    groups = json.loads(path.read_text())
    assert [g["targets"] for g in groups] == [["127.0.0.1:9100"], ["127.0.0.1:9101"]]
    config = PROMETHEUS.read_text()
    assert "file_sd_configs" in config and "prometheus/targets.json" in config


ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"


def test_alert_rules_are_well_formed_and_use_only_exported_series(
    scraped: dict[str, str],
) -> None:
    """Every alert names its series right: a typo in a rule is an alert that never fires.
    (promtool, when installed, also parses the PromQL.)"""
    rules = yaml.safe_load(ALERTS.read_text())
    (group,) = rules["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    for needed in (
        "FleetCellStale",
        "FleetSpoolGrowing",
        "FleetTrainerFailed",
        "FleetTrainerStalled",
        "FleetRollback",
        "FleetCanaryStuck",
    ):
        assert needed in alerts, f"no {needed} rule"
    for name, rule in alerts.items():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        expr = str(rule["expr"])
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), name
    used = set().union(*(metric_names(str(r["expr"])) for r in alerts.values()))
    exported = set().union(*(metric_names(t) for t in scraped.values()))
    missing = sorted(used - exported)
    assert not missing, f"alert rules use series no process exports: {missing}"
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    promtool = shutil.which("promtool")
    if promtool:
        done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_learner_exports_outcomes_cells_and_learner_state_from_the_registry(
    scraped: dict[str, str],
) -> None:
    v = _samples(scraped["learner"])
    assert v["fleet_outcome_episodes_total"] >= 1  # by version and task
    for name in ("successes", "autonomous_successes", "takeovers", "intervention_steps"):
        assert f"fleet_outcome_{name}_total" in v, name
    assert v["fleet_cell_alive"] >= 1 and "fleet_cell_spool_bytes" in v
    assert 'fleet_learner_state{state="ready"} 1.0' in scraped["learner"]
    assert "fleet_edge_spool_quarantined_total" in _samples(scraped["edge"])

"""Prometheus metrics shared by the edge and the learner: one naming scheme, one server.

Every metric is named `fleet_<part>_<what>[_unit]` (`fleet_edge_*`, `fleet_ingest_*`,
`fleet_trainer_*`) with labels `cell`, `version`, `task`, `code` where they apply, so the
Grafana dashboard in ops/grafana/ can query every process the same way.

Most numbers already exist as counters inside the components (`stats()` dictionaries); a
`StatsCollector` reads them at scrape time instead of duplicating every increment. Only
distributions (tick lateness, ack latency) are real `Histogram` instruments.

The learner's Ray actors may run on other nodes, so each one renders its own `fleet_*`
families as text (`fleet_text`) and the driver re-exposes them through a `RemoteCollector`:
one scrape target per learner no matter where Ray placed its actors.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from fleet.common.registry_records import OutcomeCounts, RolloutState, StoreTotals

log = logging.getLogger(__name__)

PREFIX = "fleet_"
# Control ticks run at 20-50 Hz: lateness that matters is a few ms to a whole period.
TICK_LATENESS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
# An ack waits for a zarr append of a chunk of frames: milliseconds, seconds when disks stall.
ACK_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

_NAME_RE = re.compile(r"\bfleet_[a-zA-Z0-9_]+")


@dataclass(frozen=True)
class Stat:
    """How one key of a stats() dictionary becomes a metric."""

    key: str
    name: str
    kind: str  # "counter" or "gauge"
    help: str


class StatsCollector(Collector):
    """Exposes numbers from a stats() callable, read fresh at every scrape.

    `labels` are constant labels for every sample (e.g. cell). Keys the callable does not
    return are left out, so a component that lacks a number simply does not export it.
    """

    def __init__(
        self,
        read: Callable[[], Mapping[str, Any]],
        stats: Iterable[Stat],
        *,
        labels: Mapping[str, str] | None = None,
        info: Callable[[], tuple[str, str, Mapping[str, str]]] | None = None,
    ) -> None:
        self.read = read
        self.stats = tuple(stats)
        self.labels = dict(labels or {})
        self.info = info

    def collect(self) -> Iterator[Metric]:
        try:
            values = self.read()
        except Exception:
            log.exception("metrics: reading stats failed (labels %s)", self.labels)
            return
        names, vals = list(self.labels), list(self.labels.values())
        for s in self.stats:
            if s.key not in values:
                continue
            v = _number(values[s.key])
            if s.kind == "counter":
                fam: Metric = CounterMetricFamily(s.name, s.help, labels=names)
            else:
                fam = GaugeMetricFamily(s.name, s.help, labels=names)
            fam.add_metric(vals, v)  # type: ignore[attr-defined]
            yield fam
        if self.info is not None:
            name, help_, extra = self.info()
            fam = InfoMetricFamily(name, help_, labels=names)
            fam.add_metric(vals, dict(extra))
            yield fam

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily; nothing to check at registration


class RemoteCollector(Collector):
    """Re-exposes `fleet_*` families that other processes rendered as text.

    Each fetcher returns exposition text (see `fleet_text`); a fetcher that fails is
    logged and skipped, so one stuck Ray actor does not blank the whole endpoint.
    """

    def __init__(self, fetchers: Mapping[str, Callable[[], str]]) -> None:
        self.fetchers = dict(fetchers)

    def collect(self) -> Iterator[Metric]:
        for name, fetch in self.fetchers.items():
            try:
                text = fetch()
            except Exception as exc:
                log.warning("metrics: fetching %s's metrics failed: %s", name, exc)
                continue
            for fam in text_string_to_metric_families(text):
                if fam.name.startswith(PREFIX):
                    yield fam

    def describe(self) -> Iterator[Metric]:
        return iter(())


def fleet_text(registry: CollectorRegistry = REGISTRY) -> str:
    """This process's `fleet_*` families as exposition text (no process_/python_ ones)."""
    restricted = _FleetOnly(registry)
    return generate_latest(restricted).decode("utf-8")  # type: ignore[arg-type]


class _FleetOnly(CollectorRegistry):
    def __init__(self, inner: CollectorRegistry) -> None:
        super().__init__(auto_describe=False)
        self._inner = inner

    def collect(self) -> Iterator[Metric]:
        for fam in self._inner.collect():
            if fam.name.startswith(PREFIX):
                yield fam


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `stop()` frees the port."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


class MetricsOptions(BaseModel):
    """--metrics-port / --metrics-host, the same on every process that serves /metrics
    (a component's options model inherits them)."""

    metrics_port: int = Field(0, description="serve Prometheus /metrics here (0 = off)")
    metrics_host: str = Field("0.0.0.0", description="address /metrics binds")


def serve_metrics(
    port: int, *, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> MetricsServer | None:
    """Serve /metrics on host:port in a daemon thread; port 0 means metrics are off."""
    if port <= 0:
        return None
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return MetricsServer(server, thread)


def register(collector: Collector, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Register a collector; returns the function that unregisters it (idempotent)."""
    registry.register(collector)
    done = threading.Event()

    def unregister() -> None:
        if not done.is_set():
            done.set()
            registry.unregister(collector)

    return unregister


def metric_names(text: str) -> set[str]:
    """Every `fleet_*` name in a text: PromQL expressions or exposition output."""
    return set(_NAME_RE.findall(text))


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# -- the stats each component exports -------------------------------------------------------

EDGE_STATS = (
    Stat("steps_recorded", "fleet_edge_steps_recorded", "counter", "steps the loop recorded"),
    Stat("episodes", "fleet_edge_episodes", "counter", "episodes finished on this cell"),
    Stat("successes", "fleet_edge_successes", "counter", "episodes that ended in success"),
    Stat("interventions", "fleet_edge_interventions", "counter", "steps an operator drove"),
    Stat("late_ticks", "fleet_edge_late_ticks", "counter", "ticks that missed their period"),
    Stat("policy_errors", "fleet_edge_policy_errors", "counter", "policy inference failures"),
    Stat("loop_hz", "fleet_edge_loop_hz", "gauge", "measured control-loop rate"),
    Stat("policy_swaps", "fleet_edge_policy_swaps", "counter", "policy versions adopted"),
    Stat("faults", "fleet_edge_faults", "counter", "faults any part of the actor reported"),
    Stat("chunks_blended", "fleet_edge_chunks_blended", "counter", "action chunks faded in"),
    Stat(
        "chunks_ready_in_time",
        "fleet_edge_chunks_ready_in_time",
        "counter",
        "follow-up chunks ready before the plan ran out",
    ),
    Stat("chunks_stale", "fleet_edge_chunks_stale", "counter", "chunks that arrived too late"),
    Stat(
        "plan_exhausted_ticks",
        "fleet_edge_plan_exhausted_ticks",
        "counter",
        "ticks that held the last target: no fresh chunk",
    ),
    # Shadow evaluation: the candidate infers beside stable and is never executed.
    Stat("shadow_calls", "fleet_edge_shadow_calls", "counter", "inferences asked of the shadow"),
    Stat("shadow_steps", "fleet_edge_shadow_steps", "counter", "steps logged with a shadow action"),
    Stat(
        "shadow_steps_missing",
        "fleet_edge_shadow_steps_missing",
        "counter",
        "steps a shadow ran for but its plan did not cover",
    ),
    Stat("shadow_errors", "fleet_edge_shadow_errors", "counter", "shadow inference failures"),
    # Servo buses (real Dynamixel arms and the SDK-level sim): drivers/cell.bus_stats.
    Stat("bus_failed", "fleet_edge_bus_failed", "counter", "servo transactions that failed"),
    Stat(
        "bus_late_replies",
        "fleet_edge_bus_late_replies",
        "counter",
        "late servo replies discarded (they answered an earlier request)",
    ),
    Stat("bus_reconnects", "fleet_edge_bus_reconnects", "counter", "servo ports reopened"),
    Stat(
        "bus_power_cycles",
        "fleet_edge_bus_power_cycles",
        "counter",
        "servo power losses found and restored",
    ),
    # A real cell's servo process (actors/servo_process.py): ServoProcess.bus_stats.
    Stat(
        "servo_dropped_steps",
        "fleet_edge_servo_dropped_steps",
        "counter",
        "ticks the servo process ran whose step the actor could not take in time",
    ),
)
UPLINK_STATS = (
    Stat("steps_acked", "fleet_edge_steps_sent", "counter", "steps acked durable by the learner"),
    Stat("chunks_sent", "fleet_edge_chunks_sent", "counter", "chunks put on the wire"),
    Stat("chunks_acked", "fleet_edge_chunks_acked", "counter", "chunks acked durable"),
    Stat("resends", "fleet_edge_resends", "counter", "chunks sent again after a failure"),
    Stat("dropped", "fleet_edge_dropped", "counter", "chunks dropped: uplink queue full"),
    Stat("rejected", "fleet_edge_rejected", "counter", "chunks the learner refused"),
    Stat("pending", "fleet_edge_uplink_pending_chunks", "gauge", "chunks waiting for an ack"),
    Stat("spool_bytes", "fleet_edge_spool_bytes", "gauge", "bytes spooled awaiting upload"),
    Stat("spool_chunks", "fleet_edge_spool_chunks", "gauge", "chunks spooled awaiting upload"),
    Stat("dropped_steps", "fleet_edge_dropped_steps", "counter", "steps dropped: spool full"),
    Stat("spool_full", "fleet_edge_spool_full", "gauge", "1 while the spool quota is full"),
    Stat(
        "spool_corrupt",
        "fleet_edge_spool_quarantined",
        "counter",
        "spool files found corrupt and moved to the spool's corrupt/ folder",
    ),
    Stat("transient_rejects", "fleet_edge_transient_rejects", "counter", "refusals retried"),
)
INGEST_STATS = (
    Stat("chunks_acked", "fleet_ingest_chunks_acked", "counter", "chunks acked durable"),
    Stat("duplicates", "fleet_ingest_duplicates", "counter", "chunks received again, acked"),
    Stat("rejected", "fleet_ingest_rejected", "counter", "chunks refused (all codes)"),
    Stat("steps_stored", "fleet_ingest_steps_stored", "counter", "steps written to the store"),
    Stat("episodes_completed", "fleet_ingest_episodes_completed", "counter", "episodes closed"),
    Stat("open_streams", "fleet_gateway_open_streams", "gauge", "streams open on the gateway"),
    Stat("calls_refused", "fleet_gateway_calls_refused", "counter", "calls refused at admission"),
)
TRAINER_STATS = (
    Stat("updates", "fleet_trainer_updates", "counter", "gradient updates done"),
    Stat("loss", "fleet_trainer_loss", "gauge", "loss of the latest update"),
    Stat("versions", "fleet_trainer_versions_published", "counter", "policy versions published"),
    Stat("replay_ratio", "fleet_trainer_replay_ratio", "gauge", "sampled steps per stored step"),
    Stat("steps_available", "fleet_trainer_steps_available", "gauge", "steps the sampler sees"),
    Stat("episodes_available", "fleet_trainer_episodes_available", "gauge", "episodes sampled"),
    Stat(
        "quarantined_episodes",
        "fleet_trainer_quarantined_episodes",
        "gauge",
        "episodes taken out of training because they cannot be read or decoded",
    ),
    Stat(
        "episodes_without_cameras",
        "fleet_trainer_episodes_without_cameras",
        "gauge",
        "episodes not trained on because they lack a camera the model sees",
    ),
    Stat(
        "steps_out_of_range",
        "fleet_trainer_steps_out_of_range",
        "gauge",
        "steps not trained on because a joint or target is outside the model's joint range",
    ),
    Stat(
        "trainer_restarts",
        "fleet_trainer_restarts",
        "counter",
        "times the training loop was restarted after an unexpected error",
    ),
)


# -- the fleet's state in Redis ------------------------------------------------------------

# Learner states a `fleet_learner_state` gauge names (1 for the current one, 0 for the rest).
LEARNER_STATES = ("starting", "ready", "failed", "stopped")
# Outcome counters of fleet.control.registry.Registry.record_episode, by version and task
# and by cell.
_OUTCOME_METRICS = (
    ("episodes", "episodes", "episodes stored"),
    ("successes", "successes", "episodes that ended in success (an operator's included)"),
    ("autonomous_successes", "autonomous_successes", "successes with no operator step"),
    ("takeovers", "takeovers", "takeovers: contiguous runs of operator-driven steps"),
    ("intervention_steps", "intervention_steps", "steps an operator drove"),
    ("steps", "steps", "steps stored"),
    ("duration_ms", "episode_seconds", "episode wall time, seconds"),
    ("demonstrations", "demonstrations", "episodes no policy version ran (all operator)"),
)


class RegistryCollector(Collector):
    """The fleet's state as Redis holds it, read at scrape time: outcomes by version and task
    and by cell, cell liveness and spool depth, learner state, store totals and rollout
    actions. Served by the learner's driver, which has the registry at hand.

    `registry` is a fleet.control.registry.Registry (not imported: this module stays Redis-free)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._collect()
        except Exception:
            log.exception("metrics: reading the fleet registry failed")

    def _collect(self) -> Iterator[Metric]:
        reg = self.registry
        by_task: dict[str, dict[str, OutcomeCounts]] = reg.success_counts()
        for key, name, help_ in _OUTCOME_METRICS:
            scale = 1e-3 if key == "duration_ms" else 1.0
            fam = CounterMetricFamily(f"fleet_outcome_{name}", help_, labels=["version", "task"])
            for version, tasks in sorted(by_task.items()):
                for task, counts in sorted(tasks.items()):
                    fam.add_metric([version, task], getattr(counts, key) * scale)
            yield fam
        by_cell: dict[str, OutcomeCounts] = reg.cell_outcomes()
        for key, name, help_ in _OUTCOME_METRICS:
            scale = 1e-3 if key == "duration_ms" else 1.0
            fam = CounterMetricFamily(f"fleet_cell_{name}", help_, labels=["cell"])
            for cell, counts in sorted(by_cell.items()):
                fam.add_metric([cell], getattr(counts, key) * scale)
            yield fam
        cells = reg.cells()
        alive = GaugeMetricFamily("fleet_cell_alive", "1 while heartbeats arrive", labels=["cell"])
        seen = GaugeMetricFamily(
            "fleet_cell_last_seen_timestamp_seconds", "the cell's last heartbeat", labels=["cell"]
        )
        spool = GaugeMetricFamily(
            "fleet_cell_spool_bytes", "bytes a cell holds awaiting an ack", labels=["cell"]
        )
        spool_chunks = GaugeMetricFamily(
            "fleet_cell_spool_chunks", "chunks a cell holds awaiting an ack", labels=["cell"]
        )
        for c in cells:
            alive.add_metric([c.cell_id], 1.0 if c.alive else 0.0)
            seen.add_metric([c.cell_id], float(c.last_seen))
            spool.add_metric([c.cell_id], float(c.counters.spool_bytes))
            spool_chunks.add_metric([c.cell_id], float(c.counters.spool_chunks))
        yield from (alive, seen, spool, spool_chunks)
        stats = reg.learner_stats()
        current = str(stats.get("state", ""))
        state = GaugeMetricFamily(
            "fleet_learner_state", "1 for the learner's current state", labels=["state"]
        )
        for name in sorted({*LEARNER_STATES, current} - {""}):
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        totals: StoreTotals = reg.store_totals()
        for key, value in totals.to_json().items():
            fam = CounterMetricFamily(f"fleet_store_{key}", f"{key} the store took in", labels=[])
            fam.add_metric([], float(value))
            yield fam
        yield from self._rollout(reg)

    def _rollout(self, reg: Any) -> Iterator[Metric]:
        ro: RolloutState = reg.rollout()
        stage = GaugeMetricFamily(
            "fleet_rollout_stage_started_timestamp_seconds",
            "when the candidate entered its current stage (absent without a candidate)",
            labels=["version", "stage"],
        )
        if ro.candidate and ro.stage and ro.stage_started_at is not None:
            stage.add_metric([ro.candidate, ro.stage], ro.stage_started_at)
        yield stage
        kinds = CounterMetricFamily(
            "fleet_rollout_events", "rollout events logged, by kind", labels=["kind"]
        )
        for kind, n in sorted(reg.event_counts().items()):
            kinds.add_metric([kind], float(n))
        yield kinds

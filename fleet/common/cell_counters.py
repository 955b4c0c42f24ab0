"""A cell's counters, named once for every side that produces or reads them.

`LoopCounters` is a snapshot of what the control loop counts (read from its `stats`); the
edge actor folds it with the uplink's and the fault log's numbers into `CellCounters`,
which is what the heartbeat carries, what the learner stores per cell in the registry and
what `fleet status`, the dashboard and the Prometheus exporter show. The heartbeat's proto
fields bear the same names, so the wire form is built from the dataclass and parsed back
into it field by field: a renamed or misspelt counter is an AttributeError, a KeyError or
a type-check failure, never a silent zero.

This module imports only protos, so the edge may use it (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from protos.fleetlearn.v1 import policy_pb2


@dataclass(frozen=True, slots=True)
class LoopCounters:
    """What the control loop counts since it started, as one snapshot of its `stats`."""

    episodes: int = 0  # finished episodes (success or failure)
    episodes_aborted: int = 0  # cut short by a stop or a fault
    successes: int = 0
    steps_recorded: int = 0
    interventions: int = 0  # steps an operator drove
    late_ticks: int = 0  # ticks that missed their period
    chunks_submitted: int = 0
    policy_calls: int = 0
    policy_errors: int = 0
    chunks_blended: int = 0  # chunks from inference blended into the plan
    chunks_followup: int = 0  # ... of those, ones that continue a running plan
    chunks_ready_in_time: int = 0  # ... of those, ready before the plan ran out
    chunks_stale: int = 0  # finished too late to contribute, or from an old version
    plan_exhausted_ticks: int = 0  # policy ticks holding the last target
    shadow_calls: int = 0  # inferences asked of the shadow version
    shadow_errors: int = 0
    shadow_chunks_stale: int = 0
    shadow_steps: int = 0  # recorded steps with a shadow action
    shadow_steps_missing: int = 0  # steps a shadow ran for but its plan did not cover

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> LoopCounters:
        """The counters from one `ControlLoop.stats` snapshot; a counter the loop does not
        report is a KeyError, never a silent zero."""
        return cls(**{f.name: int(stats[f.name]) for f in fields(cls)})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CellCounters:
    """The counters a cell's heartbeat reports (since its actor started), as the registry
    keeps them for the fleet view. Every field is a field of `policy_pb2.Heartbeat`."""

    episodes: int = 0
    successes: int = 0
    steps_recorded: int = 0
    steps_acked: int = 0  # steps the learner acked durable
    interventions: int = 0  # steps an operator drove
    late_ticks: int = 0
    loop_hz: float = 0.0  # measured control-loop rate
    fault_count: int = 0  # faults since the actor started, cleared or not
    spool_bytes: int = 0  # chunks waiting on the cell's disk for the learner's ack
    spool_chunks: int = 0

    @classmethod
    def from_loop(
        cls,
        loop: LoopCounters,
        *,
        loop_hz: float,
        steps_acked: int,
        fault_count: int,
        spool_bytes: int,
        spool_chunks: int,
    ) -> CellCounters:
        """The heartbeat's counters from the loop's and the uplink's and fault log's."""
        return cls(
            episodes=loop.episodes,
            successes=loop.successes,
            steps_recorded=loop.steps_recorded,
            steps_acked=int(steps_acked),
            interventions=loop.interventions,
            late_ticks=loop.late_ticks,
            loop_hz=float(loop_hz),
            fault_count=int(fault_count),
            spool_bytes=int(spool_bytes),
            spool_chunks=int(spool_chunks),
        )

    def fill_heartbeat(self, beat: policy_pb2.Heartbeat) -> policy_pb2.Heartbeat:
        """Set the heartbeat's counter fields from these counters; returns `beat`."""
        for f in fields(self):
            setattr(beat, f.name, getattr(self, f.name))
        return beat

    @classmethod
    def from_heartbeat(cls, beat: policy_pb2.Heartbeat) -> CellCounters:
        return cls(**{f.name: getattr(beat, f.name) for f in fields(cls)})

    def to_redis(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_redis(cls, data: dict[str, str]) -> CellCounters:
        """Counters from a stored hash; a counter the hash lacks reads as 0."""
        kwargs: dict[str, int | float] = {}
        for f in fields(cls):
            if f.name in data:
                kwargs[f.name] = float(data[f.name]) if f.type == "float" else int(data[f.name])
        return cls(**kwargs)

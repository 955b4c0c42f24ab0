"""The records the registry (fleet/control/registry.py) reads back from Redis, as typed classes.

Every consumer (learner, rollout controller, dashboard, `fleet status`, `fleet versions`,
metrics) reads their fields, so a renamed field is an AttributeError or a type-check
failure instead of a silent None or 0 from a string-keyed dict. `to_json()` gives the
plain form the dashboard API serves (its field names are part of that API).

No Redis here: fleet/common/metrics.py and the dashboard's views import these without a client.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fleet.common.cell_counters import CellCounters


@dataclass
class CellState:
    """One cell as its last heartbeat described it (`alive`: the heartbeat has not expired).
    Its counters are the heartbeat's (fleet/common/cell_counters.py), stored flat in the hash."""

    cell_id: str
    version_running: str = ""
    task: str = ""
    counters: CellCounters = field(default_factory=CellCounters)
    last_fault: str = ""  # the newest fault, only while recent (actors/edge.py FaultLog)
    shadow_version: str = ""  # the version the cell runs in shadow ("" = none)
    versions_adopted: list[dict] = field(default_factory=list)  # [{"version", "adopted_at"}]
    last_seen: float = 0.0
    alive: bool = False

    def to_redis(self) -> dict[str, str]:
        return {
            "cell_id": self.cell_id,
            "version_running": self.version_running,
            "task": self.task,
            **self.counters.to_redis(),
            "last_fault": self.last_fault,
            "shadow_version": self.shadow_version,
            "versions_adopted": json.dumps(self.versions_adopted),
            "last_seen": str(self.last_seen),
        }  # liveness is the TTL key, never a stored flag

    @classmethod
    def from_redis(cls, data: dict[str, str], *, alive: bool) -> CellState:
        adopted = data.get("versions_adopted")
        return cls(
            cell_id=data["cell_id"],
            version_running=data.get("version_running", ""),
            task=data.get("task", ""),
            counters=CellCounters.from_redis(data),
            last_fault=data.get("last_fault", ""),
            shadow_version=data.get("shadow_version", ""),
            versions_adopted=json.loads(adopted) if adopted else [],
            last_seen=float(data.get("last_seen", 0.0)),
            alive=alive,
        )


@dataclass(frozen=True)
class VersionRecord:
    """A registered version: its manifest as published (fleet/common/policy/manifest.py fields),
    where its weights are, when it was registered and its newest `fleet eval` summary (the
    registry's, else the one the manifest carries; None: not evaluated)."""

    manifest: dict[str, Any]
    weights_path: str
    published_at: float
    evaluation: dict[str, Any] | None = None

    @property
    def version_id(self) -> str:
        return str(self.manifest["version_id"])

    @property
    def parent(self) -> str | None:
        return self.manifest.get("parent")

    @property
    def training_step(self) -> int | None:
        return self.manifest.get("training_step")

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> VersionRecord:
        manifest = json.loads(raw["manifest"])
        stored = raw.get("evaluation")
        return cls(
            manifest=manifest,
            weights_path=raw["weights_path"],
            published_at=float(raw["published_at"]),
            evaluation=json.loads(stored) if stored else manifest.get("evaluation"),
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest's fields with weights_path, published_at and evaluation."""
        out = {**self.manifest, "weights_path": self.weights_path}
        out["published_at"] = self.published_at
        if self.evaluation is not None:
            out["evaluation"] = self.evaluation
        return out


@dataclass(frozen=True)
class RolloutState:
    """The rollout: mode, stable version, the candidate in flight and where it runs. Unset
    versions, mode and stage are None; unset cell lists are empty."""

    mode: str | None = None
    stable: str | None = None
    candidate: str | None = None
    stage: str | None = None  # fleet/control/registry.py ROLLOUT_STAGES
    candidate_cells: list[str] = field(default_factory=list)
    canary_cells: list[str] = field(default_factory=list)
    stage_started_at: float | None = None
    stage_episodes: int = 0  # candidate episodes when the stage began

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> RolloutState:
        return cls(
            mode=raw.get("mode") or None,
            stable=raw.get("stable") or None,
            candidate=raw.get("candidate") or None,
            stage=raw.get("stage") or None,
            candidate_cells=json.loads(raw.get("candidate_cells") or "[]"),
            canary_cells=json.loads(raw.get("canary_cells") or "[]"),
            stage_started_at=(
                float(raw["stage_started_at"]) if raw.get("stage_started_at") else None
            ),
            stage_episodes=int(raw.get("stage_episodes") or 0),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OutcomeCounts:
    """Outcome counters of finished episodes (Registry.record_episode), for one version and
    task or for one cell."""

    episodes: int = 0
    successes: int = 0
    intervention_steps: int = 0
    steps: int = 0
    intervened_episodes: int = 0  # an operator took over at least once
    autonomous_successes: int = 0  # succeeded with no intervention
    takeovers: int = 0  # contiguous runs of intervention steps
    duration_ms: int = 0  # episode wall time
    demonstrations: int = 0  # episodes no version ran: the operator drove it all

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ShadowScore:
    """How far a shadow version's actions were from the ones executed: mean distances (rad)
    to stable's and to the operator's actions; None without steps to average."""

    steps: int = 0
    operator_steps: int = 0
    mean_dist_stable: float | None = None
    mean_dist_operator: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Event:
    """One entry of the append-only event log: who did what and why, when, and the fields
    of its kind (version, cells, stage, the numbers behind a decision...) as strings."""

    id: str  # the Redis stream id: events sort by it
    kind: str
    actor: str
    reason: str
    ts: float  # unix seconds
    fields: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_redis(cls, event_id: str, entry: dict[str, str]) -> Event:
        core = ("kind", "actor", "reason", "ts")
        return cls(
            id=event_id,
            kind=entry.get("kind", ""),
            actor=entry.get("actor", ""),
            reason=entry.get("reason", ""),
            ts=float(entry["ts"]),
            fields={k: v for k, v in entry.items() if k not in core},
        )

    def to_json(self) -> dict[str, Any]:
        """Flat, as the dashboard API serves it: id, kind, actor, reason, ts, then fields."""
        core = {"id": self.id, "kind": self.kind, "actor": self.actor, "reason": self.reason}
        return {**core, "ts": self.ts, **self.fields}


@dataclass(frozen=True)
class StoreTotals:
    """Steps and episodes the episode store has taken in."""

    steps: int = 0
    episodes: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)

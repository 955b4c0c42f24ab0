"""The fleet registry in Redis: versions, rollout, cell liveness, outcomes, learner progress
and the event log. Only the centre (learner, dashboard, `fleet` commands) talks to it; cells
reach it through the learner's gRPC services.

Keys, all under one prefix (default "fleet:"):

    versions                ZSET   version id -> published_at
    version:<id>            HASH   manifest (JSON), weights_path, published_at, evaluation
                                   (JSON: the newest `fleet eval` summary,
                                   fleet/common/evaluation.py)
    rollout                 HASH   mode, stable, candidate, stage, candidate_cells (JSON
                                   list), canary_cells (JSON list), stage_started_at,
                                   stage_episodes (candidate episodes when the stage began)
    pins                    HASH   cell id -> version id (operator pins beat the rollout)
    rolled_back             SET    versions rolled back (never proposed again automatically)
    shadow                  HASH   JSON [version, counter] -> sum (shadow evaluation scores)
    cells                   SET    every cell id ever seen
    cell:<id>               HASH   the cell's last heartbeat (CellState fields)
    cell:<id>:alive         STRING present while heartbeats keep coming (TTL)
    outcomes                HASH   JSON [version, task, counter] -> count; counters:
                                   episodes, successes, intervention_steps, steps,
                                   intervened_episodes (an operator took over at least once),
                                   autonomous_successes (succeeded with no intervention),
                                   takeovers (contiguous runs of intervention steps in
                                   an episode a policy version ran), duration_ms (episode
                                   time), demonstrations (episodes with no version: the
                                   operator drove it all, which is no takeover)
    cell_outcomes           HASH   JSON [cell, counter] -> count; the same counters per cell,
                                   over the episodes a policy version ran (demonstrations
                                   only counted as such)
    learner                 HASH   learner progress (free-form scalars)
    store                   HASH   steps, episodes held by the episode store
    events                  STREAM append-only log of rollout actions and other events
    event_counts            HASH   event kind -> events of that kind ever logged
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from typing import Any

import redis

from fleet.common.registry_records import (
    CellState,
    Event,
    OutcomeCounts,
    RolloutState,
    ShadowScore,
    StoreTotals,
    VersionRecord,
)

# immediate: every cell runs the newest published version as soon as it is published.
# auto: the rollout controller (learner/rollout_controller.py) stages each version.
# manual: versions are only registered; nothing moves until an operator acts (`fleet
# rollout`, `fleet promote`, the dashboard).
ROLLOUT_MODES = ("immediate", "auto", "manual")
# A rollout's stage: shadow (candidate infers beside stable, never acts), canary (a few
# cells run it), fraction (a larger share of cells), fleet (promoted: it is stable).
ROLLOUT_STAGES = ("shadow", "canary", "fraction", "fleet")
# The version of an episode no policy ran (the operator demonstrated the task).
NO_VERSION = ("", "none")
_SHADOW_COUNTERS = ("steps", "dist_stable_sum", "operator_steps", "dist_operator_sum")


def _outcome_counts(stored: dict[str, int]) -> OutcomeCounts:
    """Counters read back from Redis; a counter not stored yet is 0."""
    return OutcomeCounts(**{name: stored[name] for name in OutcomeCounts.names() if name in stored})


def _scalar(raw: str) -> int | float | str:
    """A stored stat back as int, float or str."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


class Registry:
    """Typed access to the fleet's Redis keys. Thread-safe (redis-py pools its connections)."""

    def __init__(self, url: str, *, prefix: str = "fleet:", heartbeat_ttl_s: float = 5.0) -> None:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5.0, socket_timeout=10.0
        )
        self._setup(client, prefix=prefix, heartbeat_ttl_s=heartbeat_ttl_s)

    @classmethod
    def from_client(
        cls, client: redis.Redis, *, prefix: str = "fleet:", heartbeat_ttl_s: float = 5.0
    ) -> Registry:
        """Wrap an existing client; it must have been made with decode_responses=True."""
        if not client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("Registry needs a redis client made with decode_responses=True")
        self = cls.__new__(cls)
        self._setup(client, prefix=prefix, heartbeat_ttl_s=heartbeat_ttl_s)
        return self

    def _setup(self, client: redis.Redis, *, prefix: str, heartbeat_ttl_s: float) -> None:
        if heartbeat_ttl_s <= 0:
            raise ValueError(f"heartbeat_ttl_s must be positive, got {heartbeat_ttl_s}")
        self.r = client
        self.prefix = prefix
        self.heartbeat_ttl_s = heartbeat_ttl_s

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- versions ------------------------------------------------------------------------

    def add_version(
        self, manifest_json: str, weights_path: str, *, published_at: float | None = None
    ) -> None:
        """Register a published version. Re-adding the identical manifest is a no-op; a
        different manifest under a known version id is refused (versions are immutable)."""
        manifest = json.loads(manifest_json)
        version_id = manifest.get("version_id") if isinstance(manifest, dict) else None
        if not version_id or not isinstance(version_id, str):
            raise ValueError("manifest has no version_id")
        when = time.time() if published_at is None else float(published_at)
        key = self._k("version", version_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(key, "manifest", manifest_json)
        pipe.hsetnx(key, "weights_path", str(weights_path))
        pipe.hsetnx(key, "published_at", repr(when))
        pipe.zadd(self._k("versions"), {version_id: when}, nx=True)
        pipe.hget(key, "manifest")
        created, *_, stored = pipe.execute()
        if not created and stored != manifest_json:
            raise ValueError(f"version {version_id!r} is already registered with another manifest")

    def set_evaluation(self, version_id: str, summary_json: str) -> None:
        """Keep a `fleet eval` summary with a registered version (its record's `evaluation`;
        the manifest itself stays as published) and log it as an event."""
        summary = json.loads(summary_json)
        if not isinstance(summary, dict):
            raise ValueError("an evaluation summary must be a JSON object")
        key = self._k("version", version_id)
        if not self.r.exists(key):
            raise KeyError(f"unknown version {version_id!r}")
        numbers = {
            f"task.{task}": f"{s['successes']}/{s['episodes']}"
            for task, s in summary.get("scores", {}).get(version_id, {}).items()
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, "evaluation", summary_json)
        self._add_event(
            pipe,
            "evaluation",
            actor="fleet-eval",
            reason=f"held-out scenes, {summary.get('backend', '?')} backend",
            version=version_id,
            **numbers,
        )
        pipe.execute()

    def versions(self) -> list[VersionRecord]:
        """Every version, oldest published first."""
        ids = self.r.zrange(self._k("versions"), 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for version_id in ids:
            pipe.hgetall(self._k("version", version_id))
        return [VersionRecord.from_redis(raw) for raw in pipe.execute() if raw]

    def version(self, version_id: str) -> VersionRecord | None:
        raw = self.r.hgetall(self._k("version", version_id))
        return VersionRecord.from_redis(raw) if raw else None

    def latest_version(self) -> str | None:
        newest = self.r.zrange(self._k("versions"), -1, -1)
        return newest[0] if newest else None

    # -- rollout -------------------------------------------------------------------------

    def set_rollout_mode(self, mode: str) -> None:
        if mode not in ROLLOUT_MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; known: {', '.join(ROLLOUT_MODES)}")
        self.r.hset(self._k("rollout"), "mode", mode)

    def rollout(self) -> RolloutState:
        """The rollout: mode, stable, candidate, its stage and cells (RolloutState)."""
        return RolloutState.from_redis(self.r.hgetall(self._k("rollout")))

    def set_stable(self, version_id: str, *, actor: str, reason: str, **numbers: Any) -> None:
        """Make `version_id` the fleet's stable version and log it as an event."""
        if not self.r.exists(self._k("version", version_id)):
            raise KeyError(f"unknown version {version_id!r}")
        previous = self.r.hget(self._k("rollout"), "stable") or ""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._k("rollout"), "stable", version_id)
        self._add_event(
            pipe,
            "set_stable",
            actor=actor,
            reason=reason,
            version=version_id,
            previous=previous,
            **numbers,
        )
        pipe.execute()

    def set_candidate(
        self,
        version_id: str,
        *,
        stage: str,
        cells: Iterable[str],
        kind: str,
        actor: str,
        reason: str,
        canary_cells: Iterable[str] | None = None,
        stage_episodes: int = 0,
        **numbers: Any,
    ) -> None:
        """Set (or move to a new stage) the candidate and the cells it runs on, atomically
        with an event of `kind` naming who did it, why and the numbers behind it. In stage
        "shadow" the cells keep running stable and infer with the candidate beside it."""
        if stage not in ROLLOUT_STAGES[:-1]:
            raise ValueError(
                f"candidate stage must be one of shadow/canary/fraction, not {stage!r}"
            )
        if not self.r.exists(self._k("version", version_id)):
            raise KeyError(f"unknown version {version_id!r}")
        cell_list = sorted(set(cells))
        mapping = {
            "candidate": version_id,
            "stage": stage,
            "candidate_cells": json.dumps(cell_list),
            "stage_started_at": repr(time.time()),
            "stage_episodes": str(int(stage_episodes)),
        }
        if canary_cells is not None:
            mapping["canary_cells"] = json.dumps(sorted(set(canary_cells)))
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._k("rollout"), mapping=mapping)
        self._add_event(
            pipe,
            kind,
            actor=actor,
            reason=reason,
            version=version_id,
            stage=stage,
            cells=",".join(cell_list),
            **numbers,
        )
        pipe.execute()

    def clear_candidate(
        self, *, kind: str, actor: str, reason: str, promote: bool, **numbers: Any
    ) -> str | None:
        """End the rollout: promote the candidate to stable (stage "fleet") or drop it and
        remember it as rolled back. Returns the candidate's id, None if there was none."""
        candidate = self.r.hget(self._k("rollout"), "candidate") or None
        if candidate is None:
            return None
        previous = self.r.hget(self._k("rollout"), "stable") or ""
        pipe = self.r.pipeline(transaction=True)
        if promote:
            pipe.hset(self._k("rollout"), mapping={"stable": candidate, "stage": "fleet"})
        else:
            pipe.hdel(self._k("rollout"), "stage")
            pipe.sadd(self._k("rolled_back"), candidate)
        pipe.hdel(
            self._k("rollout"),
            "candidate",
            "candidate_cells",
            "canary_cells",
            "stage_started_at",
            "stage_episodes",
        )
        self._add_event(
            pipe,
            kind,
            actor=actor,
            reason=reason,
            version=candidate,
            previous=previous,
            **numbers,
        )
        pipe.execute()
        return candidate

    def block_version(self, version_id: str, *, actor: str, reason: str, **numbers: Any) -> None:
        """Keep a version that never became the candidate from ever being proposed (the
        rollout's sim gate found it credibly worse): remembered as rolled back, logged as a
        "sim_gate_block" event with the numbers."""
        if not self.r.exists(self._k("version", version_id)):
            raise KeyError(f"unknown version {version_id!r}")
        pipe = self.r.pipeline(transaction=True)
        pipe.sadd(self._k("rolled_back"), version_id)
        self._add_event(
            pipe, "sim_gate_block", actor=actor, reason=reason, version=version_id, **numbers
        )
        pipe.execute()

    def rolled_back(self) -> set[str]:
        """Versions that were rolled back (the controller never proposes them again)."""
        return set(self.r.smembers(self._k("rolled_back")))

    def set_pin(self, cell_id: str, version_id: str, *, actor: str, reason: str) -> None:
        """Pin a cell to a version: it runs that version whatever the rollout says."""
        if not self.r.exists(self._k("version", version_id)):
            raise KeyError(f"unknown version {version_id!r}")
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._k("pins"), cell_id, version_id)
        self._add_event(pipe, "pin", actor=actor, reason=reason, cell=cell_id, version=version_id)
        pipe.execute()

    def clear_pin(self, cell_id: str, *, actor: str, reason: str) -> str | None:
        """Unpin a cell; returns the version it was pinned to (None: it was not pinned)."""
        was = self.r.hget(self._k("pins"), cell_id) or None
        if was is None:
            return None
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self._k("pins"), cell_id)
        self._add_event(pipe, "unpin", actor=actor, reason=reason, cell=cell_id, version=was)
        pipe.execute()
        return was

    def pins(self) -> dict[str, str]:
        """cell id -> pinned version id."""
        return dict(self.r.hgetall(self._k("pins")))

    def _rollout_and_pins(self) -> tuple[RolloutState, dict[str, str]]:
        """The rollout and the per-cell pins, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self._k("rollout"))
        pipe.hgetall(self._k("pins"))
        rollout, pins = pipe.execute()
        return RolloutState.from_redis(rollout), pins

    def assignments(self, cell_ids: Iterable[str]) -> dict[str, str | None]:
        """The version each cell should run, in one round trip for all of them.

        Precedence: a per-cell pin, then the candidate for cells in its cell set (unless
        the candidate is only in shadow: shadow cells keep acting with stable), then stable.
        """
        state, pins = self._rollout_and_pins()
        stable, candidate = state.stable, state.candidate
        acting = candidate is not None and state.stage in ("canary", "fraction")
        candidate_cells = set(state.candidate_cells)
        out: dict[str, str | None] = {}
        for cell_id in cell_ids:
            if cell_id in pins:
                out[cell_id] = pins[cell_id]
            elif acting and cell_id in candidate_cells:
                out[cell_id] = candidate
            else:
                out[cell_id] = stable
        return out

    def shadow_assignments(self, cell_ids: Iterable[str]) -> dict[str, str | None]:
        """The version each cell should run in shadow (None: none): the candidate on its
        cells while the rollout is in stage "shadow"."""
        state = self.rollout()
        cells = set(state.candidate_cells)
        shadow = state.candidate if state.stage == "shadow" else None
        return {c: (shadow if c in cells else None) for c in cell_ids}

    def prefetch_assignments(self, cell_ids: Iterable[str]) -> dict[str, list[str]]:
        """The versions each cell may soon run besides its own, most likely first, for it to
        fetch ahead (a promotion or next stage is then only a swap), in one round trip.

        While there is a candidate: a cell that runs stable gets the candidate (the next
        stage or the promotion hands it over); a cell acting with the candidate gets stable
        (a rollback sends it back). A pinned cell gets nothing (the rollout does not move
        it), nor does a shadow cell (it fetches the candidate already, as its shadow)."""
        state, pins = self._rollout_and_pins()
        stable, candidate, stage = state.stable, state.candidate, state.stage
        cells = set(state.candidate_cells)
        out: dict[str, list[str]] = {}
        for cell_id in cell_ids:
            if candidate is None or cell_id in pins:
                out[cell_id] = []
            elif cell_id not in cells:
                out[cell_id] = [candidate]
            elif stage in ("canary", "fraction") and stable and stable != candidate:
                out[cell_id] = [stable]
            else:
                out[cell_id] = []
        return out

    def assignment_for(self, cell_id: str) -> str | None:
        return self.assignments([cell_id])[cell_id]

    # -- cells ---------------------------------------------------------------------------

    def record_heartbeat(self, state: CellState) -> None:
        """Store the cell's state and (re)arm its liveness key for heartbeat_ttl_s."""
        if not state.cell_id:
            raise ValueError("heartbeat without a cell_id")
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self._k("cell", state.cell_id), mapping=state.to_redis())
        pipe.set(
            self._k("cell", state.cell_id, "alive"),
            "1",
            px=max(1, math.ceil(self.heartbeat_ttl_s * 1000)),
        )
        pipe.sadd(self._k("cells"), state.cell_id)
        pipe.execute()

    def cells(self) -> list[CellState]:
        """Every cell ever seen, sorted by id; `alive` is False once its heartbeat expired."""
        ids = sorted(self.r.smembers(self._k("cells")))
        pipe = self.r.pipeline(transaction=False)
        for cell_id in ids:
            pipe.hgetall(self._k("cell", cell_id))
            pipe.exists(self._k("cell", cell_id, "alive"))
        replies = pipe.execute()
        out = []
        for cell_id, raw, alive in zip(ids, replies[0::2], replies[1::2], strict=True):
            out.append(CellState.from_redis({"cell_id": cell_id, **raw}, alive=bool(alive)))
        return out

    # -- outcomes ------------------------------------------------------------------------

    def record_episode(
        self,
        *,
        cell_id: str,
        version: str,
        task: str,
        success: bool,
        steps: int,
        intervention_steps: int,
        takeovers: int | None = None,
        duration_s: float = 0.0,
    ) -> None:
        """Count one finished episode toward (version, task) and toward its cell.

        `autonomous_successes` counts episodes that succeeded with no operator intervention:
        rollout decisions use it, so an episode an operator had to rescue counts as a failure
        of the version (a success the operator made is not the policy's). `takeovers` is the
        number of contiguous runs of intervention steps (None: at least one if any step was
        an intervention); `duration_s` the episode's wall time, for per-hour figures. An
        episode with no version (NO_VERSION) is a demonstration: no takeover, and its cell
        counts it only as a demonstration."""
        intervened = int(intervention_steps) > 0
        demonstration = version in NO_VERSION
        if demonstration:
            takeovers = 0  # nothing to take over from: the operator drove it all
        elif takeovers is None:
            takeovers = int(intervened)
        episode = OutcomeCounts(
            episodes=1,
            successes=int(bool(success)),
            intervention_steps=int(intervention_steps),
            steps=int(steps),
            intervened_episodes=int(intervened),
            autonomous_successes=int(bool(success) and not intervened),
            takeovers=int(takeovers),
            duration_ms=max(0, round(float(duration_s) * 1000)),
            demonstrations=int(demonstration),
        )
        pipe = self.r.pipeline(transaction=True)
        for counter, amount in episode.to_json().items():
            pipe.hincrby(self._k("outcomes"), json.dumps([version, task, counter]), amount)
            # A cell's figures describe it running policies; demonstrations are only counted.
            if not demonstration or counter == "demonstrations":
                pipe.hincrby(self._k("cell_outcomes"), json.dumps([cell_id, counter]), amount)
        pipe.execute()

    def success_counts(self) -> dict[str, dict[str, OutcomeCounts]]:
        """version -> task -> the counters of `record_episode` (OutcomeCounts)."""
        raw: dict[str, dict[str, dict[str, int]]] = {}
        for name, count in self.r.hgetall(self._k("outcomes")).items():
            version, task, counter = json.loads(name)
            raw.setdefault(version, {}).setdefault(task, {})[counter] = int(count)
        return {
            version: {task: _outcome_counts(c) for task, c in tasks.items()}
            for version, tasks in raw.items()
        }

    def cell_outcomes(self) -> dict[str, OutcomeCounts]:
        """cell -> the counters of `record_episode`, per cell, as the learner stored them
        (they outlive the cell's actor, unlike its heartbeat counters)."""
        raw: dict[str, dict[str, int]] = {}
        for name, count in self.r.hgetall(self._k("cell_outcomes")).items():
            cell_id, counter = json.loads(name)
            raw.setdefault(cell_id, {})[counter] = int(count)
        return {cell_id: _outcome_counts(c) for cell_id, c in raw.items()}

    def record_shadow(
        self,
        *,
        version: str,
        steps: int,
        dist_stable_sum: float,
        operator_steps: int,
        dist_operator_sum: float,
    ) -> None:
        """Add a shadow run's action distances: summed over `steps` the distance of the shadow
        version's action to the action executed (stable's or the operator's), and over the
        `operator_steps` where an operator intervened, its distance to the operator's."""
        key = self._k("shadow")
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(key, json.dumps([version, "steps"]), int(steps))
        pipe.hincrbyfloat(key, json.dumps([version, "dist_stable_sum"]), float(dist_stable_sum))
        pipe.hincrby(key, json.dumps([version, "operator_steps"]), int(operator_steps))
        pipe.hincrbyfloat(key, json.dumps([version, "dist_operator_sum"]), float(dist_operator_sum))
        pipe.execute()

    def shadow_scores(self) -> dict[str, ShadowScore]:
        """version -> its ShadowScore (means are None without steps)."""
        sums: dict[str, dict[str, float]] = {}
        for name, value in self.r.hgetall(self._k("shadow")).items():
            version, counter = json.loads(name)
            sums.setdefault(version, dict.fromkeys(_SHADOW_COUNTERS, 0.0))[counter] = float(value)
        out: dict[str, ShadowScore] = {}
        for version, s in sums.items():
            out[version] = ShadowScore(
                steps=int(s["steps"]),
                operator_steps=int(s["operator_steps"]),
                mean_dist_stable=s["dist_stable_sum"] / s["steps"] if s["steps"] else None,
                mean_dist_operator=(
                    s["dist_operator_sum"] / s["operator_steps"] if s["operator_steps"] else None
                ),
            )
        return out

    # -- learner progress ----------------------------------------------------------------

    def set_learner_stats(self, **stats: float | int | str | None) -> None:
        """Overwrite the given learner stats (others stay); a None value removes the stat."""
        present = {k: str(v) for k, v in stats.items() if v is not None}
        absent = [k for k, v in stats.items() if v is None]
        pipe = self.r.pipeline(transaction=True)
        if present:
            pipe.hset(self._k("learner"), mapping=present)
        if absent:
            pipe.hdel(self._k("learner"), *absent)
        pipe.execute()

    def learner_stats(self) -> dict:
        """The learner stats, numbers parsed back to int or float."""
        return {k: _scalar(v) for k, v in self.r.hgetall(self._k("learner")).items()}

    def add_store_totals(self, steps: int, episodes: int) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(self._k("store"), "steps", int(steps))
        pipe.hincrby(self._k("store"), "episodes", int(episodes))
        pipe.execute()

    def store_totals(self) -> StoreTotals:
        """Steps and episodes the episode store has taken in."""
        raw = self.r.hgetall(self._k("store"))
        return StoreTotals(steps=int(raw.get("steps", 0)), episodes=int(raw.get("episodes", 0)))

    # -- events --------------------------------------------------------------------------

    def _add_event(self, target: Any, kind: str, *, actor: str, reason: str, **extra: Any) -> Any:
        entry = {"kind": kind, "actor": actor, "reason": reason, "ts": repr(time.time())}
        for name, value in extra.items():
            if name in entry:
                raise ValueError(f"event field {name!r} is reserved")
            entry[name] = str(value)
        target.hincrby(self._k("event_counts"), kind, 1)
        return target.xadd(self._k("events"), entry)

    def log_event(self, kind: str, *, actor: str, reason: str, **fields: str | int | float) -> str:
        """Append an event (who did what and why) to the log; returns its stream id."""
        return self._add_event(self.r, kind, actor=actor, reason=reason, **fields)

    def event_counts(self) -> dict[str, int]:
        """kind -> events of that kind ever logged (for Prometheus counters and alerts)."""
        return {k: int(v) for k, v in self.r.hgetall(self._k("event_counts")).items()}

    def events(self, count: int = 100) -> list[Event]:
        """The newest `count` events, oldest first."""
        newest_first = self.r.xrevrange(self._k("events"), count=count)
        return [Event.from_redis(event_id, entry) for event_id, entry in reversed(newest_first)]

    # -- connection ----------------------------------------------------------------------

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self.r.close()

"""What `fleet eval` measures and keeps: per policy and task, successes out of episodes on
held-out scenes with a 95 % Wilson interval and the mean final progress (the task's dense
reward at the episode's last step), the version beside its baselines on the same scenes.

The runner lives on the cell side (actors/evaluate.py: it drives simulated cells through the
cell's own control loop); this module holds only plain data, so the learner (the rollout's
sim gate), the dashboard and the `fleet` commands read results without importing a cell.
A result is stored with its version twice: in the version's manifest file (its
`evaluation` field) and in the registry's version record (`Registry.set_evaluation`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile

#: baseline names `fleet eval --baselines` knows
BASELINES = ("untrained", "expert")


def wilson_interval(successes: int, episodes: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a success rate ((0, 1) without episodes)."""
    if not 0 <= successes <= episodes:
        raise ValueError(f"need 0 <= successes <= episodes, got {successes}/{episodes}")
    if episodes == 0:
        return 0.0, 1.0
    p = successes / episodes
    z2 = z * z
    centre = (p + z2 / (2 * episodes)) / (1 + z2 / episodes)
    half = z * math.sqrt(p * (1 - p) / episodes + z2 / (4 * episodes**2)) / (1 + z2 / episodes)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == episodes else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class EpisodeRecord:
    """One evaluated episode. `trace_sha256` digests its step-by-step joint positions and
    commanded actions: two runs of one scene are the same episode when the digests match."""

    policy: str  # the version id, or a baseline name
    task: str
    seed: int
    success: bool
    reason: str
    steps: int
    reward: float
    intervention_steps: int = 0
    trace_sha256: str = ""


@dataclass(frozen=True)
class TaskScore:
    task: str
    successes: int
    episodes: int
    mean_progress: float
    ci95: tuple[float, float]

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The figures as stored and printed (rounded)."""
        return {
            "successes": self.successes,
            "episodes": self.episodes,
            "success_rate": round(self.rate, 4),
            "ci95": [round(self.ci95[0], 4), round(self.ci95[1], 4)],
            "mean_progress": round(self.mean_progress, 4),
        }


def score(records: Iterable[EpisodeRecord]) -> dict[str, dict[str, TaskScore]]:
    """policy -> task -> TaskScore. A success counts only when no step was an operator's
    (eval runs without takeovers; this keeps a rescued episode from ever counting)."""
    grouped: dict[str, dict[str, list[EpisodeRecord]]] = {}
    for r in records:
        grouped.setdefault(r.policy, {}).setdefault(r.task, []).append(r)
    out: dict[str, dict[str, TaskScore]] = {}
    for policy, per_task in grouped.items():
        for task, rs in sorted(per_task.items()):
            wins = sum(
                1 for r in rs if r.success and (policy == "expert" or not r.intervention_steps)
            )
            out.setdefault(policy, {})[task] = TaskScore(
                task,
                wins,
                len(rs),
                sum(r.reward for r in rs) / len(rs),
                wilson_interval(wins, len(rs)),
            )
    return out


@dataclass
class EvalResult:
    """One `fleet eval` run: the version and its baselines on the same held-out scenes."""

    version: str
    backend: str
    tasks: tuple[str, ...]
    episodes_per_task: int
    seed_start: int  # held-out scene indices seed_start .. seed_start + episodes - 1
    seeds: tuple[int, ...]  # the held-out scene seeds (fleet.common.scenes.heldout_seed)
    baselines: tuple[str, ...]
    records: list[EpisodeRecord] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    duration_s: float = 0.0

    @property
    def scores(self) -> dict[str, dict[str, TaskScore]]:
        return score(self.records)

    def summary(self) -> dict[str, Any]:
        """What is stored with the version: scores per policy and task, no episode list."""
        return {
            "version": self.version,
            "backend": self.backend,
            "tasks": list(self.tasks),
            "episodes_per_task": self.episodes_per_task,
            "seed_start": self.seed_start,
            "baselines": list(self.baselines),
            "evaluated_at": self.started_at,
            "duration_s": round(self.duration_s, 3),
            "scores": {
                policy: {task: s.to_dict() for task, s in per_task.items()}
                for policy, per_task in self.scores.items()
            },
        }

    def to_json(self) -> str:
        """The summary plus every episode record, as one line of JSON."""
        out = self.summary()
        out["seeds"] = list(self.seeds)
        out["episodes"] = [asdict(r) for r in self.records]
        return json.dumps(out, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> EvalResult:
        d = json.loads(text)
        return cls(
            version=d["version"],
            backend=d["backend"],
            tasks=tuple(d["tasks"]),
            episodes_per_task=int(d["episodes_per_task"]),
            seed_start=int(d["seed_start"]),
            seeds=tuple(int(s) for s in d.get("seeds", ())),
            baselines=tuple(d.get("baselines", ())),
            records=[EpisodeRecord(**r) for r in d.get("episodes", [])],
            started_at=float(d.get("evaluated_at", 0.0)),
            duration_s=float(d.get("duration_s", 0.0)),
        )


def successes_by_task(summary: Mapping[str, Any], policy: str) -> dict[str, tuple[int, int]]:
    """task -> (successes, episodes) of `policy` in a stored summary ({} if absent)."""
    per_task = summary.get("scores", {}).get(policy, {})
    return {t: (int(s["successes"]), int(s["episodes"])) for t, s in per_task.items()}


def store_evaluation(
    summary: Mapping[str, Any],
    *,
    manifest_path: Path | None = None,
    registry: Any = None,
) -> None:
    """Keep an evaluation with its version: in the manifest file's `evaluation` field
    (rewritten atomically; the signature covers only id and sha256, so it stays valid) and
    in the registry's version record. Each is optional."""
    version = str(summary["version"])
    if manifest_path is not None:
        from fleet.common.policy.manifest import Manifest
        from fleet.common.policy.weights import write_atomic

        manifest = Manifest.from_json(Path(manifest_path).read_text())
        if manifest.version_id != version:
            raise ValueError(
                f"{manifest_path} is the manifest of {manifest.version_id}, not of {version}"
            )
        manifest.evaluation = dict(summary)
        write_atomic(Path(manifest_path), manifest.to_json().encode())
    if registry is not None:
        registry.set_evaluation(version, json.dumps(summary, sort_keys=True, allow_nan=False))

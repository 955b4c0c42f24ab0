"""Staged rollout of policy versions: the operator actions and the decision rule.

Actions (used by `fleet` commands, the dashboard and the rollout controller) change the
rollout state in the registry and log an event naming who did it, why and the numbers.
Stages: an operator may first run a candidate in shadow (it infers beside stable, never
acts; `start_shadow`), `promote` then moves it to canary on the same cells; or start at
canary (`start_rollout`). Canary -> fraction -> fleet follows the rule below.

The decision rule (`decide`) compares a candidate with stable on episode outcomes.

* A trial is one finished episode of that version on that task; it is a success only when
  the task succeeded with no operator intervention (`autonomous_successes`): an episode an
  operator had to take over counts as a failure of the version.
* Each version's per-task success rate has a Beta(1 + successes, 1 + failures) posterior
  (Beta(1, 1) prior). Outcomes are pooled across cells (one tally per version and task).
* Per task, P(p_cand < p_stable - margin) is estimated by Monte Carlo from the two
  posteriors (`samples` draws, fixed seed so a decision is reproducible).
* Pooled over tasks, the difference D = sum_t w_t (p_cand,t - p_stable,t), weighting each
  task by its share of the candidate's episodes (a stratified comparison: a candidate is
  never judged against stable on a different mix of tasks).
* Roll back when any task with at least `min_task_episodes` candidate episodes has
  P(worse by more than margin) > `threshold`, or when P(D < -margin) > `threshold` after at
  least `min_episodes` candidate episodes.
* Advance (canary -> fraction -> fleet) when the candidate has at least `min_episodes`
  episodes and P(D >= -margin) > `threshold` and no task is credibly worse.
* Otherwise wait for more episodes. The rule is sequential: it is re-evaluated as outcomes
  arrive, so a broken version is caught after a few dozen episodes while a close call keeps
  collecting evidence instead of being decided on a fixed, possibly too small, sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fleet.common.registry_records import OutcomeCounts, RolloutState
from fleet.control.registry import Registry

log = logging.getLogger(__name__)

Action = Literal["rollback", "advance", "wait"]


@dataclass(frozen=True)
class TaskTally:
    """One version's outcomes on one task: autonomous successes out of episodes."""

    successes: int
    episodes: int

    def __post_init__(self) -> None:
        if not 0 <= self.successes <= self.episodes:
            raise ValueError(f"need 0 <= successes <= episodes, got {self}")


@dataclass(frozen=True)
class RuleConfig:
    margin: float = 0.10  # a drop of this much in success rate is what we must not ship
    threshold: float = 0.95  # posterior probability needed to act
    min_episodes: int = 30  # candidate episodes (all tasks) before advancing / pooled rollback
    min_task_episodes: int = 10  # candidate episodes on a task before it can veto
    samples: int = 20_000  # Monte Carlo draws per posterior
    seed: int = 0


@dataclass(frozen=True)
class TaskComparison:
    task: str
    candidate: TaskTally
    stable: TaskTally
    p_worse: float  # P(p_cand < p_stable - margin)


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    candidate_episodes: int
    p_worse: float  # pooled P(D < -margin)
    p_not_worse: float  # pooled P(D >= -margin)
    tasks: tuple[TaskComparison, ...] = field(default_factory=tuple)

    def numbers(self) -> dict[str, Any]:
        """Flat fields for the event log."""
        out: dict[str, Any] = {
            "decision": self.action,
            "candidate_episodes": self.candidate_episodes,
            "p_worse": round(self.p_worse, 4),
            "p_not_worse": round(self.p_not_worse, 4),
        }
        for t in self.tasks:
            out[f"task.{t.task}"] = (
                f"cand {t.candidate.successes}/{t.candidate.episodes} "
                f"stable {t.stable.successes}/{t.stable.episodes} p_worse {t.p_worse:.3f}"
            )
        return out


def decide(
    stable: Mapping[str, TaskTally],
    candidate: Mapping[str, TaskTally],
    config: RuleConfig | None = None,
) -> Decision:
    """The rollout decision for `candidate` against `stable` (task -> TaskTally each); pure."""
    cfg = config or RuleConfig()
    rng = np.random.default_rng(cfg.seed)
    tasks = sorted(t for t, tally in candidate.items() if tally.episodes > 0)
    total = sum(candidate[t].episodes for t in tasks)
    if not tasks:
        return Decision("wait", "no candidate episodes yet", 0, 0.0, 0.0)
    pooled = np.zeros(cfg.samples)
    comparisons = []
    for task in tasks:
        cand = candidate[task]
        base = stable.get(task, TaskTally(0, 0))
        p_c = rng.beta(1 + cand.successes, 1 + cand.episodes - cand.successes, cfg.samples)
        p_s = rng.beta(1 + base.successes, 1 + base.episodes - base.successes, cfg.samples)
        diff = p_c - p_s
        pooled += (cand.episodes / total) * diff
        p_worse = float(np.mean(diff < -cfg.margin))
        comparisons.append(TaskComparison(task, cand, base, p_worse))
    p_worse = float(np.mean(pooled < -cfg.margin))
    p_not_worse = 1.0 - p_worse
    found = tuple(comparisons)
    vetoes = [
        c
        for c in found
        if c.candidate.episodes >= cfg.min_task_episodes and c.p_worse > cfg.threshold
    ]
    if vetoes:
        worst = max(vetoes, key=lambda c: c.p_worse)
        reason = (
            f"credibly worse on task {worst.task}: P(success drop > {cfg.margin:.2f}) = "
            f"{worst.p_worse:.3f} > {cfg.threshold} (candidate {worst.candidate.successes}/"
            f"{worst.candidate.episodes}, stable {worst.stable.successes}/{worst.stable.episodes})"
        )
        return Decision("rollback", reason, total, p_worse, p_not_worse, found)
    if total < cfg.min_episodes:
        return Decision(
            "wait",
            f"{total} candidate episodes, need {cfg.min_episodes} before deciding",
            total,
            p_worse,
            p_not_worse,
            found,
        )
    if p_worse > cfg.threshold:
        reason = (
            f"credibly worse pooled over tasks: P(success drop > {cfg.margin:.2f}) = "
            f"{p_worse:.3f} > {cfg.threshold} over {total} episodes"
        )
        return Decision("rollback", reason, total, p_worse, p_not_worse, found)
    if p_not_worse > cfg.threshold:
        reason = (
            f"not credibly worse: P(success drop <= {cfg.margin:.2f}) = {p_not_worse:.3f} > "
            f"{cfg.threshold} over {total} episodes"
        )
        return Decision("advance", reason, total, p_worse, p_not_worse, found)
    return Decision(
        "wait",
        f"undecided: P(not worse) = {p_not_worse:.3f} over {total} episodes",
        total,
        p_worse,
        p_not_worse,
        found,
    )


def tallies(counts: Mapping[str, OutcomeCounts]) -> dict[str, TaskTally]:
    """task -> TaskTally from one version's `Registry.success_counts()` entry (autonomous
    successes: an episode with an intervention is a failure)."""
    return {task: TaskTally(c.autonomous_successes, c.episodes) for task, c in counts.items()}


def evaluate(registry: Registry, config: RuleConfig | None = None) -> Decision | None:
    """The decision for the current candidate against stable (None: no candidate)."""
    state = registry.rollout()
    if not state.candidate:
        return None
    counts = registry.success_counts()
    stable = tallies(counts.get(state.stable or "", {}))
    return decide(stable, tallies(counts.get(state.candidate, {})), config)


# -- actions ---------------------------------------------------------------------------


def _known_cells(registry: Registry) -> list[str]:
    return [c.cell_id for c in registry.cells()]


def _alive_cells(registry: Registry) -> list[str]:
    return [c.cell_id for c in registry.cells() if c.alive]


def _candidate_episodes(registry: Registry, version_id: str) -> int:
    per_task = registry.success_counts().get(version_id, {})
    return sum(c.episodes for c in per_task.values())


def _choose_cells(registry: Registry, spec: int | Sequence[str], what: str) -> list[str]:
    """The first `spec` live cells (known cells when none is live), or the named cells."""
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"need at least one {what} cell, got {spec}")
        pool = _alive_cells(registry) or _known_cells(registry)
        cells = pool[:spec]
    else:
        cells = sorted(set(spec))
    if not cells:
        raise ValueError(f"no {what} cells: no cell is known to the registry")
    return cells


def _check_candidate(registry: Registry, version_id: str) -> RolloutState:
    """The rollout state, once `version_id` may become the candidate: it is known, not
    stable, and no other candidate is in flight."""
    if registry.version(version_id) is None:
        raise KeyError(f"unknown version {version_id!r}")
    state = registry.rollout()
    if state.candidate and state.candidate != version_id:
        raise RuntimeError(
            f"version {state.candidate} is already rolling out; promote or roll it back first"
        )
    if state.stable == version_id:
        raise ValueError(f"version {version_id} is stable already")
    return state


def start_rollout(
    registry: Registry,
    version_id: str,
    canary: int | Sequence[str],
    *,
    actor: str,
    reason: str,
) -> list[str]:
    """Make `version_id` the candidate on canary cells: the first `canary` live cells (an
    int) or the named cells. Refused while another candidate is in flight or when the
    version is stable already. Returns the canary cells."""
    state = _check_candidate(registry, version_id)
    cells = _choose_cells(registry, canary, "canary")
    registry.set_candidate(
        version_id,
        stage="canary",
        cells=cells,
        canary_cells=cells,
        kind="rollout_start",
        actor=actor,
        reason=reason,
        stage_episodes=_candidate_episodes(registry, version_id),
        stable=state.stable or "",
    )
    log.info("rollout of %s started on canary cells %s by %s: %s", version_id, cells, actor, reason)
    return cells


def start_shadow(
    registry: Registry,
    version_id: str,
    cells: int | Sequence[str],
    *,
    actor: str,
    reason: str,
) -> list[str]:
    """Run `version_id` in shadow on `cells` (the first N live cells, or the named ones): it
    infers beside stable on the same observations, its actions are logged and scored
    against the executed ones (`Registry.shadow_scores`), never commanded. Stage "shadow"
    comes before canary: `promote` moves it on to canary on the same cells, `rollback` ends
    it. Refused while another candidate is in flight, for the stable version, and for a
    candidate that already acts on cells (going back to shadow would be a rollback)."""
    state = _check_candidate(registry, version_id)
    if state.candidate == version_id and state.stage != "shadow":
        raise RuntimeError(
            f"version {version_id} already acts in stage {state.stage}; "
            "roll it back before running it in shadow"
        )
    chosen = _choose_cells(registry, cells, "shadow")
    registry.set_candidate(
        version_id,
        stage="shadow",
        cells=chosen,
        kind="shadow_start",
        actor=actor,
        reason=reason,
        stable=state.stable or "",
    )
    log.info("shadow run of %s started on cells %s by %s: %s", version_id, chosen, actor, reason)
    return chosen


def advance(
    registry: Registry,
    cells: Sequence[str],
    *,
    stage: str,
    actor: str,
    reason: str,
    **numbers: Any,
) -> list[str]:
    """Move the candidate to `stage` ("canary" or "fraction") on `cells`."""
    state = registry.rollout()
    if not state.candidate:
        raise RuntimeError("no candidate is rolling out")
    chosen = sorted(set(cells) | set(state.candidate_cells))
    registry.set_candidate(
        state.candidate,
        stage=stage,
        cells=chosen,
        kind="rollout_advance",
        actor=actor,
        reason=reason,
        stage_episodes=_candidate_episodes(registry, state.candidate),
        **numbers,
    )
    return chosen


def fraction_cells(registry: Registry, fraction: float) -> list[str]:
    """The canary cells plus enough others to make `fraction` of the known cells."""
    state = registry.rollout()
    cells = _known_cells(registry)
    want = max(1, math.ceil(fraction * len(cells)))
    chosen = list(state.candidate_cells)
    for cell_id in cells:
        if len(chosen) >= want:
            break
        if cell_id not in chosen:
            chosen.append(cell_id)
    return sorted(chosen)


def promote(registry: Registry, *, actor: str, reason: str, **numbers: Any) -> str:
    """Move the candidate one step on; returns its id.

    From stage "shadow" it starts acting as a canary on the cells it shadowed (event
    "shadow_to_canary", with the shadow scores as numbers): a version is never made stable
    on shadow evidence alone, since shadow scores measure how far its actions are from the
    executed ones, not whether it succeeds. From then on the usual rule applies (the
    controller's `decide` in mode "auto", or an operator's promote). From canary or
    fraction it becomes the stable version on every (unpinned) cell."""
    state = registry.rollout()
    candidate = state.candidate
    if candidate and state.stage == "shadow":
        cells = state.candidate_cells
        if not cells:
            raise RuntimeError(f"shadow run of {candidate} has no cells to start a canary on")
        score = registry.shadow_scores().get(candidate)
        shadow_numbers = {
            f"shadow_{k}": v
            for k, v in (score.to_json() if score else {}).items()
            if v is not None and k not in numbers
        }
        registry.set_candidate(
            candidate,
            stage="canary",
            cells=cells,
            canary_cells=cells,
            kind="shadow_to_canary",
            actor=actor,
            reason=reason,
            stage_episodes=_candidate_episodes(registry, candidate),
            stable=state.stable or "",
            **shadow_numbers,
            **numbers,
        )
        log.info(
            "version %s moved from shadow to canary on %s by %s: %s",
            candidate,
            cells,
            actor,
            reason,
        )
        return candidate
    promoted = registry.clear_candidate(
        kind="promote", actor=actor, reason=reason, promote=True, **numbers
    )
    if promoted is None:
        raise RuntimeError("no candidate to promote")
    log.info("version %s promoted to stable by %s: %s", promoted, actor, reason)
    return promoted


def rollback(registry: Registry, *, actor: str, reason: str, **numbers: Any) -> str | None:
    """Drop the candidate: every cell goes back to stable (a shadow run simply ends). The
    version is remembered as rolled back. Returns the rolled-back version (None when
    nothing was rolling out; the no-op is still logged)."""
    stage = registry.rollout().stage
    if stage and "stage" not in numbers:
        numbers["stage"] = stage  # "shadow": this rollback ended a shadow run
    dropped = registry.clear_candidate(
        kind="rollback", actor=actor, reason=reason, promote=False, **numbers
    )
    if dropped is None:
        registry.log_event("rollback_noop", actor=actor, reason=reason)
        log.info("rollback by %s: nothing was rolling out", actor)
    else:
        log.warning("version %s rolled back by %s: %s", dropped, actor, reason)
    return dropped


def pin(registry: Registry, cell_id: str, version_id: str, *, actor: str) -> None:
    """Pin a cell to a version (it ignores the rollout until unpinned)."""
    registry.set_pin(cell_id, version_id, actor=actor, reason=f"pinned to {version_id}")


def unpin(registry: Registry, cell_id: str, *, actor: str) -> None:
    """Return a cell to the rollout; KeyError when it was not pinned."""
    if registry.clear_pin(cell_id, actor=actor, reason="unpinned") is None:
        raise KeyError(f"cell {cell_id!r} is not pinned")

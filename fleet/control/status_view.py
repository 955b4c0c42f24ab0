"""The live fleet table, drawn from Redis: shared by `fleet up` and `fleet status`."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table

from fleet.common.registry_records import OutcomeCounts
from fleet.control.interventions import figures
from fleet.control.registry import Registry


def _rate(successes: int, episodes: int) -> str:
    return f"{successes / episodes:.0%} ({successes}/{episodes})" if episodes else "-"


def render(registry: Registry) -> Group:
    """Per cell: episodes, steps, version (and shadow version), success, faults; then the
    learner's progress, the rollout and the shadow evaluation scores.

    A cell's fault column shows its newest fault only while it is recent (the cell clears
    it after 60 s fault-free); "faults" counts every fault since its actor started."""
    cells = Table(title="cells", expand=False)
    for col in (
        "cell",
        "alive",
        "task",
        "episodes",
        "steps sent",
        "version",
        "shadow",
        "success",
        "takeovers/h",
        "takeovers/ep",
        "intervention share",
        "intervention steps",
        "spool",
        "loop Hz",
        "faults",
        "recent fault",
    ):
        cells.add_column(col)
    outcomes = registry.cell_outcomes()
    for c in sorted(registry.cells(), key=lambda c: c.cell_id):
        f = figures(outcomes.get(c.cell_id, OutcomeCounts()))
        n = c.counters
        cells.add_row(
            c.cell_id,
            "yes" if c.alive else "[red]stale[/red]",
            c.task,
            str(n.episodes),
            str(n.steps_acked),
            c.version_running or "-",
            c.shadow_version or "-",
            _rate(n.successes, n.episodes),
            _num(f["takeovers_per_hour"], "{:.1f}"),
            _num(f["takeovers_per_episode"], "{:.2f}"),
            _num(f["intervention_share"], "{:.1%}"),
            str(n.interventions),
            f"{n.spool_chunks} ({n.spool_bytes / 1e6:.1f} MB)",
            f"{n.loop_hz:.1f}",
            str(n.fault_count),
            c.last_fault or "",
        )
    stats = registry.learner_stats()
    store = registry.store_totals()
    learner = Table(title="learner", expand=False)
    for col in (
        "state",
        "updates",
        "loss",
        "upd/s",
        "versions",
        "latest",
        "store steps",
        "store episodes",
        "replay ratio",
        "quarantined",
        "trainer restarts",
    ):
        learner.add_column(col)

    def num(key: str, fmt: str = "{:.0f}") -> str:
        try:
            return fmt.format(float(stats[key]))
        except (KeyError, ValueError):
            return "-"

    learner.add_row(
        str(stats.get("state", "-")),
        num("updates"),
        num("loss", "{:.4f}"),
        num("updates_per_s", "{:.1f}"),
        str(len(registry.versions())),
        registry.latest_version() or "-",
        str(store.steps),
        str(store.episodes),
        num("replay_ratio", "{:.1f}"),
        num("quarantined_episodes"),
        num("trainer_restarts"),
    )
    # Why training last restarted, and which episode was last quarantined (if ever).
    trainer_state = str(stats.get("trainer_state", ""))
    problems = [
        # What the trainer waits for, if anything (tasks, the operators' demonstrations).
        f"trainer: {trainer_state}" if trainer_state not in ("", "training") else "",
        f"trainer error: {stats['trainer_error']}" if stats.get("trainer_error") else "",
        f"quarantined: {stats['last_quarantined']}" if stats.get("last_quarantined") else "",
        (
            f"not trained on: {stats['episodes_without_cameras']} episodes without a camera "
            f"the model sees (check --cameras), e.g. {stats['last_without_cameras']}"
            if stats.get("last_without_cameras")
            else ""
        ),
        (
            f"not trained on: {stats['steps_out_of_range']} steps outside the model's joint "
            f"range (check calibration), e.g. {stats['last_out_of_range']}"
            if stats.get("last_out_of_range")
            else ""
        ),
    ]
    if any(problems):
        learner.caption = "\n".join(p for p in problems if p)
    ro = registry.rollout()
    pins = registry.pins()
    rollout = Table(title="rollout", expand=False)
    for col in ("mode", "stable", "candidate", "stage", "cells on candidate", "pins"):
        rollout.add_column(col)
    rollout.add_row(
        str(ro.mode or "-"),
        str(ro.stable or "-"),
        str(ro.candidate or "-"),
        str(ro.stage or "-"),
        ", ".join(ro.candidate_cells) or "-",
        ", ".join(f"{c}={v}" for c, v in sorted(pins.items())) or "-",
    )
    per_task = Table(title="success by version and task", expand=False)
    for col in (
        "version",
        "task",
        "episodes",
        "success",
        "autonomous",
        "takeovers",
        "takeovers/h",
        "takeovers/ep",
        "intervention share",
        "human steps/autonomous success",
        "intervention steps",
    ):
        per_task.add_column(col)
    for version, tasks in sorted(registry.success_counts().items()):
        for task, n in sorted(tasks.items()):
            f = figures(n)
            per_task.add_row(
                version,
                task,
                str(n.episodes),
                _rate(n.successes, n.episodes),
                _rate(n.autonomous_successes, n.episodes),
                str(n.takeovers),
                _num(f["takeovers_per_hour"], "{:.1f}"),
                _num(f["takeovers_per_episode"], "{:.2f}"),
                _num(f["intervention_share"], "{:.1%}"),
                _num(f["human_steps_per_autonomous_success"], "{:.0f}"),
                str(n.intervention_steps),
            )
    shadow = Table(title="shadow evaluation (mean action distance, rad)", expand=False)
    for col in ("version", "steps", "vs stable", "operator steps", "vs operator"):
        shadow.add_column(col)
    for version, score in sorted(registry.shadow_scores().items()):
        shadow.add_row(
            version,
            str(score.steps),
            _mean(score.mean_dist_stable),
            str(score.operator_steps),
            _mean(score.mean_dist_operator),
        )
    return Group(cells, learner, rollout, per_task, shadow)


def _mean(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)

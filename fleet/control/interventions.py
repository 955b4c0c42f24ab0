"""Interventions as people count them.

A control loop flags every tick an operator drives (an *intervention step*: 20-50 a second
while a person holds the leader arms). Fleet-learning papers and people report *takeovers*:
one takeover is one contiguous run of intervention steps. This module turns step flags into
takeovers and counters into the figures the dashboard, `fleet status` and Prometheus show,
so every view computes them the same way.
"""

from __future__ import annotations

import numpy as np

from fleet.common.registry_records import OutcomeCounts


def count_takeovers(flags: np.ndarray, *, previous: bool = False) -> int:
    """Takeovers that start in `flags` (one bool per step). `previous` is the flag of the step
    before the first one (the end of the last chunk), so a takeover that spans chunks counts
    once."""
    f = np.asarray(flags, dtype=bool).ravel()
    if f.size == 0:
        return 0
    starts = int(np.count_nonzero(f[1:] & ~f[:-1]))
    return starts + int(bool(f[0]) and not previous)


def figures(counts: OutcomeCounts) -> dict[str, float | None]:
    """Per-hour and per-episode figures from outcome counters (episodes, steps,
    intervention_steps, takeovers, duration_ms, autonomous_successes); a figure whose
    denominator is zero is None (unknown, not zero).

    - takeovers_per_hour: takeovers per hour of episode time
    - takeovers_per_episode
    - intervention_share: the share of steps (= of time, the loop runs at a fixed rate) an
      operator drove
    - human_steps_per_autonomous_success: operator steps spent per episode the policy
      finished alone (the return on human effort; lower is better)
    """
    episodes = counts.episodes
    steps = counts.steps
    human = counts.intervention_steps
    takeovers = counts.takeovers
    hours = counts.duration_ms / 3.6e6
    autonomous = counts.autonomous_successes
    return {
        "takeovers_per_hour": takeovers / hours if hours > 0 else None,
        "takeovers_per_episode": takeovers / episodes if episodes else None,
        "intervention_share": human / steps if steps else None,
        "human_steps_per_autonomous_success": human / autonomous if autonomous else None,
    }

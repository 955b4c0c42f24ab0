"""The rollout decision rule: credibly worse rolls back, equal advances once there is enough
evidence, and too little evidence waits."""

from __future__ import annotations

import pytest

from fleet.common.registry_records import OutcomeCounts
from fleet.control.rollout import RuleConfig, TaskTally, decide, tallies


def test_credibly_worse_candidate_is_rolled_back() -> None:
    stable = {"pick": TaskTally(80, 100)}
    decision = decide(stable, {"pick": TaskTally(2, 20)})
    assert decision.action == "rollback"
    assert "pick" in decision.reason
    assert decision.tasks[0].p_worse > 0.95
    assert decision.numbers()["decision"] == "rollback"


def test_one_credibly_worse_task_vetoes_even_when_the_pool_looks_fine() -> None:
    stable = {"pick": TaskTally(50, 100), "fold": TaskTally(80, 100)}
    candidate = {"pick": TaskTally(190, 200), "fold": TaskTally(1, 20)}
    decision = decide(stable, candidate)
    assert decision.action == "rollback"
    assert "fold" in decision.reason


def test_equal_candidate_advances_after_enough_episodes() -> None:
    stable = {"pick": TaskTally(300, 400), "fold": TaskTally(200, 400)}
    candidate = {"pick": TaskTally(150, 200), "fold": TaskTally(100, 200)}
    decision = decide(stable, candidate)
    assert decision.action == "advance"
    assert decision.p_not_worse > 0.95
    assert decision.candidate_episodes == 400


def test_too_few_episodes_waits() -> None:
    stable = {"pick": TaskTally(80, 100)}
    assert decide(stable, {}).action == "wait"
    assert decide(stable, {"pick": TaskTally(4, 5)}).action == "wait"
    # Equal rates but far from enough evidence to rule out a 10-point drop: keep collecting.
    undecided = decide(stable, {"pick": TaskTally(32, 40)})
    assert undecided.action == "wait"
    assert "undecided" in undecided.reason


def test_a_task_below_its_minimum_cannot_veto() -> None:
    config = RuleConfig(min_task_episodes=10, min_episodes=1000)
    decision = decide({"pick": TaskTally(90, 100)}, {"pick": TaskTally(0, 5)}, config)
    assert decision.action == "wait"


def test_decisions_are_reproducible() -> None:
    stable, candidate = {"pick": TaskTally(60, 100)}, {"pick": TaskTally(25, 40)}
    assert decide(stable, candidate) == decide(stable, candidate)


def test_interventions_count_as_failures() -> None:
    counts = {"pick": OutcomeCounts(episodes=10, successes=9, autonomous_successes=3)}
    assert tallies(counts) == {"pick": TaskTally(3, 10)}


def test_tally_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        TaskTally(5, 3)

"""The learning history in Redis: one sample per interval however many processes offer one,
a fine tier for recent hours and a coarse one for weeks, each with its retention bound."""

from __future__ import annotations

import time

import pytest

from fleet.control.dashboard.history import LearningHistory
from fleet.control.registry import Registry


def _offer(history: LearningHistory, now: float) -> dict:
    """A sample at the simulated time `now`, in every tier: the interval has passed for
    each, so their sampling slots are free (the slots expire in real time, the test's clock
    is simulated)."""
    history.registry.r.delete(*(history._key("slot", t.name) for t in history.tiers))
    point = history.sample(now)
    assert point is not None
    return point


def test_two_processes_write_one_sample_per_interval(registry: Registry) -> None:
    a = LearningHistory(registry, interval_s=30.0, coarse_interval_s=60.0)
    b = LearningHistory(registry, interval_s=30.0, coarse_interval_s=60.0)
    registry.set_learner_stats(loss=0.3)
    assert a.sample() is not None
    assert b.sample() is None  # the learner and a dashboard both sample: no duplicates
    assert len(b.points()) == 1 and b.points()[0]["loss"] == pytest.approx(0.3)


def test_old_samples_move_to_the_coarse_tier_and_expire(registry: Registry) -> None:
    h = LearningHistory(
        registry,
        interval_s=0.01,
        fine_retention_s=10.0,
        coarse_interval_s=0.01,
        coarse_retention_s=1000.0,
    )
    t0 = time.time() - 2000.0
    for i in range(40):  # one sample every 50 s over 2,000 s, store growing 100 steps each
        registry.add_store_totals(steps=100, episodes=1)
        _offer(h, t0 + 50.0 * i)
    points = h.points()
    # The fine tier keeps the last 10 s (one sample); the coarse one the last 1,000 s.
    times = [p["t"] for p in points]
    assert times == sorted(times) and len(times) == len(set(times))
    assert min(times) >= t0 + 1950.0 - 1000.0
    assert max(times) == pytest.approx(t0 + 50.0 * 39)
    assert all(p["steps_per_s"] == pytest.approx(2.0) for p in points[1:])
    (newest,) = h.points(since=t0 + 50.0 * 38)  # polling: only what is new since then
    assert newest["t"] == points[-1]["t"] and newest["steps_per_s"] is None  # no predecessor
    assert len(h.points(max_points=5)) == 5


def test_reads_are_thinned_to_a_chart_sized_series(registry: Registry) -> None:
    h = LearningHistory(registry, interval_s=0.01, coarse_interval_s=0.01)
    t0 = time.time() - 100.0
    for i in range(30):
        _offer(h, t0 + i)
    thinned = h.points(max_points=10)
    assert len(thinned) == 10 and thinned[-1]["t"] == pytest.approx(t0 + 29)

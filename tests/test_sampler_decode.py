"""Frames decoded by the Ray decode pool equal in-process decoding, and outcome (advantage)
weighting raises successful episodes' weight over failed ones only when switched on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from learner.decode_pool import DecodePool
from learner.sampler import EpisodeSampler, SamplerConfig, advantage_weight
from learner.store import EpisodeStore
from tests.expert_episodes import CAMERAS, record_expert_episodes

TASKS = ("pick_cube", "touch_target")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> EpisodeStore:
    s = EpisodeStore(tmp_path_factory.mktemp("store"))
    record_expert_episodes(s, task="pick_cube", episodes=1, seed=1)
    record_expert_episodes(s, task="touch_target", episodes=1, seed=2)
    return s


def test_pool_batches_equal_in_process_decoding(store: EpisodeStore, ray_local: None) -> None:
    cfg = SamplerConfig(batch_size=16, min_steps=1)
    local = EpisodeSampler(store, CAMERAS, TASKS, cfg, seed=7)
    pool = DecodePool(2, num_cpus=0.5)
    try:
        pooled = EpisodeSampler(store, CAMERAS, TASKS, cfg, seed=7, decoder=pool)
        local.refresh(force=True)
        pooled.refresh(force=True)
        for _ in range(2):
            a, b = local.sample(), pooled.sample()
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
            assert a["images"].any()
    finally:
        pool.close()


def test_advantage_weight_formula() -> None:
    assert advantage_weight(1.0, 0.5, 1.0, 20.0) == pytest.approx(math.exp(0.5))
    assert advantage_weight(0.0, 0.5, 1.0, 20.0) == pytest.approx(math.exp(-0.5))
    assert advantage_weight(1.0, 0.0, 0.1, 20.0) == 20.0  # clipped
    assert advantage_weight(0.5, 0.5, 1.0, 20.0) == 1.0


def test_advantage_weighting_favours_successful_episodes(tmp_path: Path) -> None:
    s = EpisodeStore(tmp_path / "store")
    record_expert_episodes(s, task="pick_cube", episodes=2, seed=3)
    off = EpisodeSampler(s, CAMERAS, TASKS, SamplerConfig(batch_size=8, min_steps=1))
    on = EpisodeSampler(
        s, CAMERAS, TASKS, SamplerConfig(batch_size=8, min_steps=1, advantage_weighting=True)
    )
    off.refresh(force=True)
    on.refresh(force=True)
    eps = on._episodes
    # Make the outcomes differ: one success, one failure (the expert usually succeeds).
    refs = sorted(eps, key=lambda r: r.episode_id)
    eps[refs[0]].ret, eps[refs[1]].ret = 1.0, 0.0
    off._episodes[refs[0]].ret, off._episodes[refs[1]].ret = 1.0, 0.0
    assert off.episode_weight(refs[0]) == off.episode_weight(refs[1]) == 1.0
    assert on.episode_weight(refs[0]) == pytest.approx(math.exp(0.5))
    assert on.episode_weight(refs[1]) == pytest.approx(math.exp(-0.5))
    batch = on.sample()
    allowed = np.array([2.0 * math.exp(0.5), 2.0 * math.exp(-0.5)])  # x intervention 2.0
    for w in batch["weight"]:
        assert np.isclose(allowed, w, rtol=1e-5).any(), w

"""Which recorded steps the trainer imitates: the operator's always, the policy's only from
episodes it finished alone with success (it must not learn its own failed attempts)."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg

from learner.chunks import CameraColumn, DecodedChunk
from learner.sampler import EpisodeSampler, SamplerConfig
from learner.store import EpisodeStore

CAMERAS = ("overhead",)
TASKS = ("pick_cube", "touch_target")
N = 20
_JPEG = simplejpeg.encode_jpeg(np.zeros((8, 8, 3), np.uint8), quality=90, colorspace="RGB")


def _episode(
    store: EpisodeStore,
    name: str,
    operator: np.ndarray,
    success: bool,
    *,
    task: str = "touch_target",
    version: str = "v1",
    frame: bytes = _JPEG,
    side: int = 8,
) -> None:
    """One episode whose joint_pos[:, 0] encodes (episode number, step) for identification."""
    number = int(name.split("-")[1])
    q = np.zeros((N, 14), np.float32)
    q[:, 0] = number * 100 + np.arange(N)
    store.append(
        DecodedChunk(
            cell_id="cell-a",
            episode_id=name,
            seq=0,
            first_step=0,
            task=task,
            policy_version=version,
            timestamp=np.arange(N, dtype=np.float64) * 0.05,
            joint_pos=q,
            action=q.copy(),
            intervention=operator,
            reward=np.zeros(N, np.float32),
            cameras={"overhead": CameraColumn("overhead", "jpeg", side, side, 3, [frame] * N)},
            last=True,
            outcome={
                "success": success,
                "reason": "success" if success else "timeout",
                "started_at": 0.0,
                "ended_at": (N - 1) * 0.05,
            },
        )
    )


def _sampled_steps(store: EpisodeStore, policy_steps: str) -> set[tuple[int, int]]:
    cfg = SamplerConfig(batch_size=64, min_steps=1, policy_steps=policy_steps)
    sampler = EpisodeSampler(store, CAMERAS, TASKS, cfg, seed=3)
    sampler.refresh(force=True)
    seen: set[tuple[int, int]] = set()
    for _ in range(40):
        q0 = sampler.sample()["joint_pos"][:, 0].astype(int)
        seen |= {(int(v) // 100, int(v) % 100) for v in q0}
    # Frames are read once per sampled episode, never for one that is not sampled.
    assert sampler.frame_reads == len({e for e, _ in seen})
    return seen


@pytest.fixture
def store(tmp_path) -> EpisodeStore:
    s = EpisodeStore(tmp_path / "store")
    taken_over = np.zeros(N, bool)
    taken_over[12:] = True  # the operator took over at step 12 and finished the task
    _episode(s, "ep-1", np.ones(N, bool), success=True)  # a demonstration
    _episode(s, "ep-2", np.zeros(N, bool), success=True)  # the policy alone, success
    _episode(s, "ep-3", np.zeros(N, bool), success=False)  # the policy alone, failure
    _episode(s, "ep-4", taken_over, success=True)  # the policy stalled, the operator fixed it
    return s


def test_policy_steps_are_imitated_only_from_its_own_successes(store: EpisodeStore) -> None:
    seen = _sampled_steps(store, "successful")
    episodes = {e for e, _ in seen}
    assert episodes == {1, 2, 4}  # never the failed autonomous episode
    assert {t for e, t in seen if e == 4} == set(range(12, N))  # only the operator's part
    assert {t for e, t in seen if e in (1, 2)} == set(range(N))


def test_all_policy_steps_when_asked(store: EpisodeStore) -> None:
    seen = _sampled_steps(store, "all")
    assert {e for e, _ in seen} == {1, 2, 3, 4}
    assert {t for e, t in seen if e == 4} == set(range(N))


def test_unknown_policy_steps_mode_is_refused(store: EpisodeStore) -> None:
    with pytest.raises(ValueError, match="policy_steps"):
        EpisodeSampler(store, CAMERAS, TASKS, SamplerConfig(min_steps=1, policy_steps="some"))


def test_frames_stay_within_the_cache_and_come_back_from_the_store(tmp_path) -> None:
    """Months of data must not live in the learner's memory: beyond frame_cache_mb the
    sampler drops the least recently sampled episodes' frames and reads them back."""
    store = EpisodeStore(tmp_path / "store")
    big = simplejpeg.encode_jpeg(
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8),
        quality=95,
        colorspace="RGB",
    )
    for e in range(1, 9):
        operator = np.ones(N, bool)
        _episode(store, f"ep-{e}", operator, True, task="pick_cube", version="", frame=big, side=64)
    episode_bytes = N * len(big)
    budget_mb = 1
    assert 8 * episode_bytes > (budget_mb << 20) > 2 * episode_bytes  # 8 episodes do not fit
    cfg = SamplerConfig(batch_size=16, min_steps=1, frame_cache_mb=budget_mb)
    sampler = EpisodeSampler(store, CAMERAS, TASKS, cfg, seed=1)
    sampler.refresh(force=True)
    assert sampler.episodes_available == 8
    for _ in range(20):
        batch = sampler.sample()
        assert sampler.frame_cache_bytes <= budget_mb << 20
        # every image decodes from the right bytes, cached or read back
        expected = simplejpeg.decode_jpeg(big, colorspace="RGB")
        np.testing.assert_array_equal(batch["images"][0, 0], expected)
    assert sampler.frame_reads > 8  # more reads than episodes: evicted ones were re-read


def test_a_long_episode_is_read_and_kept_a_block_at_a_time(tmp_path) -> None:
    """An episode far longer than the frame cache is sampled from blocks of rows: only the
    blocks a batch touches are read, the cache stays within its budget, and every image is
    its own step's frame."""
    n, rows = 600, 50
    frames = [
        simplejpeg.encode_jpeg(np.full((8, 8, 3), t % 250, np.uint8), quality=100) for t in range(n)
    ]
    store = EpisodeStore(tmp_path / "store")
    for start in range(0, n, 200):  # three chunks, as a cell sends them
        steps = np.arange(start, start + 200)
        q = np.zeros((200, 14), np.float32)
        q[:, 0] = steps
        store.append(
            DecodedChunk(
                cell_id="cell-a",
                episode_id="ep-long",
                seq=start // 200,
                first_step=start,
                task="pick_cube",
                policy_version="",
                timestamp=steps * 0.05,
                joint_pos=q,
                action=q.copy(),
                intervention=np.ones(200, bool),
                reward=np.zeros(200, np.float32),
                cameras={
                    "overhead": CameraColumn(
                        "overhead", "jpeg", 8, 8, 3, frames[start : start + 200]
                    )
                },
                last=start + 200 == n,
                outcome={"success": True, "reason": "success", "started_at": 0.0, "ended_at": 30.0}
                if start + 200 == n
                else None,
            )
        )
    block_bytes = max(sum(len(f) for f in frames[b : b + rows]) for b in range(0, n, rows))
    cfg = SamplerConfig(batch_size=4, min_steps=1, frame_block_rows=rows, frame_cache_mb=0)
    sampler = EpisodeSampler(store, CAMERAS, TASKS, cfg, seed=5)
    sampler.refresh(force=True)
    blocks: set[int] = set()
    for _ in range(10):
        batch = sampler.sample()
        for q, img in zip(batch["joint_pos"], batch["images"][:, 0], strict=True):
            t = int(q[0])
            blocks.add(t // rows)
            assert abs(int(img.mean()) - t % 250) <= 1  # the frame of step t, not another
        # A budget of 0 keeps only the newest block: never the episode.
        assert sampler.frame_cache_bytes <= block_bytes
    # Only touched blocks are read, each at most once a sample (the cache holds one).
    assert len(blocks) > 1 and len(blocks) <= sampler.frame_reads <= 40
    assert all(first % rows == 0 for _ref, first in sampler._frames)


def test_task_weights_set_each_tasks_share_of_a_batch(tmp_path) -> None:
    """A lab can give a lagging task more of every batch, or leave one out (weight 0)
    without deleting its episodes."""
    s = EpisodeStore(tmp_path / "store")
    _episode(s, "ep-1", np.ones(N, bool), success=True, task="pick_cube")
    _episode(s, "ep-2", np.ones(N, bool), success=True, task="pick_cube")
    _episode(s, "ep-3", np.ones(N, bool), success=True, task="touch_target")

    def share_of_pick(weights: tuple[tuple[str, float], ...]) -> float:
        cfg = SamplerConfig(batch_size=64, min_steps=1, task_weights=weights)
        sampler = EpisodeSampler(s, CAMERAS, TASKS, cfg, seed=5)
        sampler.refresh(force=True)
        ids = np.concatenate([sampler.sample()["task_id"] for _ in range(30)])
        return float(np.mean(ids == TASKS.index("pick_cube")))

    assert share_of_pick(()) == pytest.approx(0.5, abs=0.05)  # equal, not by episode count
    assert share_of_pick((("touch_target", 3.0),)) == pytest.approx(0.25, abs=0.05)
    assert share_of_pick((("pick_cube", 0.0),)) == 0.0
    cfg = SamplerConfig(min_steps=1, task_weights=(("pick_cube", 0.0), ("touch_target", 0.0)))
    sampler = EpisodeSampler(s, CAMERAS, TASKS, cfg)
    assert not sampler.ready()  # the trainer waits rather than failing batch after batch
    with pytest.raises(RuntimeError, match="task weights"):
        sampler.sample()
    for bad in ((("juggle", 1.0),), (("pick_cube", -1.0),), (("pick_cube", float("inf")),)):
        with pytest.raises(ValueError, match="task weight"):
            EpisodeSampler(s, CAMERAS, TASKS, SamplerConfig(task_weights=bad))

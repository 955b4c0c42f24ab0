"""Nothing stops training: an episode the trainer cannot decode is quarantined (marked in the
store, counted, shown in metrics and `fleet status`) and training goes on; an unexpected
error in the training loop restarts it, and the error shows in `fleet status`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from prometheus_client import CollectorRegistry
from rich.console import Console

from fleet.common import metrics
from fleet.common.policy.model import resize_images
from fleet.control.registry import Registry
from fleet.control.status_view import render
from learner.chunks import CameraColumn, DecodedChunk
from learner.sampler import EpisodeSampler, SamplerConfig, steps_in_range
from learner.store import EpisodeRef, EpisodeStore
from learner.trainer import Trainer, TrainerConfig
from protos.joint_layout import JOINT_LOWER, JOINT_UPPER
from tests.expert_episodes import CAMERAS, record_expert_episodes
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)

TASKS = ("pick_cube", "touch_target")
# Starts like a JPEG (SOI + APP0 marker) but is no image at all.
NOT_A_JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4
GREY = simplejpeg.encode_jpeg(np.full((96, 128, 3), 128, np.uint8), colorspace="RGB")


def _write_episode(
    store: EpisodeStore,
    episode_id: str,
    frames: list[bytes],
    *,
    side: tuple[int, int],
    cameras: tuple[str, ...] = CAMERAS,
    cell_id: str = "cell-bad",
    joints: np.ndarray | None = None,
) -> EpisodeRef:
    """A complete operator episode of `len(frames)` steps with the given frames (joints and
    actions all `joints`, default zeros)."""
    n = len(frames)
    q = np.zeros((n, 14), np.float32) if joints is None else joints.astype(np.float32)
    h, w = side
    store.append(
        DecodedChunk(
            cell_id=cell_id,
            episode_id=episode_id,
            seq=0,
            first_step=0,
            task="pick_cube",
            policy_version="",
            timestamp=np.arange(n, dtype=np.float64) * 0.05,
            joint_pos=q,
            action=q.copy(),
            intervention=np.ones(n, bool),
            reward=np.zeros(n, np.float32),
            cameras={cam: CameraColumn(cam, "jpeg", h, w, 3, list(frames)) for cam in cameras},
            last=True,
            outcome={"success": True, "reason": "success", "started_at": 0.0, "ended_at": 1.0},
        )
    )
    return EpisodeRef(cell_id, episode_id)


def _trainer(tmp_path: Path, redis_server: str, prefix: str, **extra: float) -> Trainer:
    cfg = TrainerConfig(
        tasks=TASKS,
        cameras=CAMERAS,
        publish_every_updates=10_000,
        sampler=SamplerConfig(batch_size=8, min_steps=1, refresh_interval_s=0.1),
        **extra,  # type: ignore[arg-type]
    )
    return Trainer(
        cfg, tmp_path / "store", tmp_path / "versions", redis_server, registry_prefix=prefix
    )


def test_undecodable_episode_is_quarantined_and_training_goes_on(
    tmp_path: Path, redis_server: str, ray_local: None
) -> None:
    store = EpisodeStore(tmp_path / "store")
    record_expert_episodes(store, task="touch_target", episodes=1, seed=3)
    record_expert_episodes(store, task="pick_cube", episodes=1, seed=4)
    bad = _write_episode(store, "ep-poison", [NOT_A_JPEG] * 30, side=(96, 128))
    # A cell whose front camera was left out of its config: set aside, not quarantined.
    one_camera = _write_episode(
        store, "ep-overhead", [GREY] * 30, side=(96, 128), cameras=("overhead",), cell_id="c1"
    )
    # A cell whose left waist reads a turn off (a calibration gone wrong): not trained on.
    turned = np.zeros((30, 14), np.float32)
    turned[:, 0] = 2 * np.pi
    _write_episode(store, "ep-turned", [GREY] * 30, side=(96, 128), cell_id="c2", joints=turned)
    prefix = f"q{time.time_ns()}:"
    registry = Registry(redis_server, prefix=prefix)
    trainer = _trainer(tmp_path, redis_server, prefix)
    trainer.start()
    try:
        # pick_cube has two episodes, so batches keep drawing the poisoned one until it goes.
        wait_for(lambda: trainer.sampler.quarantined >= 1, 120, "the poisoned episode quarantined")
        at_quarantine = trainer.updates
        wait_for(lambda: trainer.updates >= at_quarantine + 20, 120, "20 more updates")
        assert trainer._thread is not None and trainer._thread.is_alive()
        assert trainer.restarts == 0, trainer.last_error
        assert trainer.sampler.quarantined == 1
        wait_for(
            lambda: registry.learner_stats().get("quarantined_episodes") == 1,
            30,
            "the quarantine count in the registry",
        )
        scrape_registry = CollectorRegistry()
        metrics.register(
            metrics.StatsCollector(trainer.stats, metrics.TRAINER_STATS), scrape_registry
        )
        text = metrics.fleet_text(scrape_registry)
        assert "fleet_trainer_quarantined_episodes 1.0" in text
        assert "fleet_trainer_episodes_without_cameras 1.0" in text
        assert "fleet_trainer_steps_out_of_range 30.0" in text
        assert trainer.sampler.without_cameras == 1
        wait_for(
            lambda: registry.learner_stats().get("episodes_without_cameras") == 1,
            30,
            "the count of episodes without the model's cameras in the registry",
        )
    finally:
        trainer.stop()
    # Marked in the store itself, with a reason a person can act on; the episode without
    # a camera is not marked.
    assert set(EpisodeStore(tmp_path / "store").quarantined()) == {bad}
    assert one_camera not in EpisodeStore(tmp_path / "store").quarantined()
    assert "do not decode" in EpisodeStore(tmp_path / "store").quarantined()[bad]
    console = Console(width=250, record=True)
    console.print(render(registry))
    text = console.export_text()
    assert "cell-bad/ep-poison" in text
    assert "not trained on: 1 episodes without a camera the model sees" in text
    assert "c1/ep-overhead: lacks camera front; has overhead" in text
    assert "not trained on: 30 steps outside the model's joint range" in text
    assert "c2/ep-turned: left_waist joint 6.283 at step 0" in text
    # A fresh sampler (a restarted learner) never indexes it again, and still counts it.
    fresh = EpisodeSampler(EpisodeStore(tmp_path / "store"), CAMERAS, TASKS, trainer.sampler.config)
    fresh.refresh(force=True)
    assert fresh.quarantined == 1 and fresh.without_cameras == 1
    assert fresh.out_of_range_steps == 30
    assert fresh.episodes_available == 5  # indexed, three of them not sampled
    assert sorted(fresh._by_task["pick_cube"] + fresh._by_task["touch_target"]) == [
        EpisodeRef("cell-t", "ep-3-0000"),
        EpisodeRef("cell-t", "ep-4-0000"),
    ]


def test_frames_of_the_wrong_size_or_missing_are_quarantined_not_sampled(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path / "store")
    record_expert_episodes(store, task="pick_cube", episodes=1, seed=1)
    small = simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8), colorspace="RGB")
    wrong_size = _write_episode(store, "ep-small", [small] * 20, side=(96, 128))
    cut = _write_episode(store, "ep-cut", [NOT_A_JPEG[:40]] * 20, side=(96, 128))
    sampler = EpisodeSampler(
        store, CAMERAS, TASKS, SamplerConfig(batch_size=16, min_steps=1), seed=7
    )
    sampler.refresh(force=True)
    for _ in range(40):
        batch = sampler.sample()
        assert batch["images"].shape == (16, 2, 96, 128, 3)
    assert sampler.quarantined == 2
    reasons = store.quarantined()
    assert set(reasons) == {wrong_size, cut}
    assert "a frame is 16x16, not 128x96" in reasons[wrong_size]
    # Every batch drawn after the quarantine holds only the good episode's rows.
    good = store.read_episode(EpisodeRef("cell-t", "ep-1-0000"))
    for _ in range(5):
        batch = sampler.sample()
        for q in batch["joint_pos"]:
            assert (np.abs(good.joint_pos - q).sum(axis=1) == 0).any()


def test_training_loop_restarts_after_an_unexpected_error(
    tmp_path: Path, redis_server: str, ray_local: None
) -> None:
    store = EpisodeStore(tmp_path / "store")
    record_expert_episodes(store, task="touch_target", episodes=1, seed=5)
    prefix = f"r{time.time_ns()}:"
    registry = Registry(redis_server, prefix=prefix)
    trainer = _trainer(tmp_path, redis_server, prefix, restart_backoff_s=0.05)
    real_sample = trainer.sampler.sample
    failures = iter([True, False, True])  # fails twice among its first calls

    def flaky_sample() -> dict[str, np.ndarray]:
        if next(failures, False):
            raise OSError("store disk went away for a moment")
        return real_sample()

    trainer.sampler.sample = flaky_sample  # type: ignore[method-assign]
    trainer.start()
    try:
        wait_for(lambda: trainer.updates >= 10, 120, "10 updates after two loop failures")
        assert trainer.restarts == 2
        assert "OSError: store disk went away" in trainer.last_error
        wait_for(
            lambda: registry.learner_stats().get("trainer_restarts") == 2,
            30,
            "the restart count in the registry",
        )
    finally:
        trainer.stop()
    console = Console(width=250, record=True)
    console.print(render(registry))
    text = console.export_text()
    assert "trainer error: OSError: store disk went away for a moment" in text


def test_a_failing_decoder_quarantines_nothing_and_batches_still_come(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path / "store")
    record_expert_episodes(store, task="pick_cube", episodes=1, seed=2)

    def dead_pool(jpegs: list[bytes]) -> list[np.ndarray]:
        raise RuntimeError("decode worker died")  # as a Ray actor death surfaces

    sampler = EpisodeSampler(
        store, CAMERAS, TASKS, SamplerConfig(batch_size=8, min_steps=1), decoder=dead_pool
    )
    sampler.refresh(force=True)
    batch = sampler.sample()
    assert batch["images"].shape == (8, 2, 96, 128, 3) and batch["images"].any()
    assert sampler.quarantined == 0 and not store.quarantined()


def test_a_sampler_with_the_wrong_cameras_marks_nothing_and_the_right_ones_find_it_all(
    tmp_path: Path,
) -> None:
    """A learner restarted with a camera the cells do not record must not take the store out
    of training for good: nothing is quarantined, and the right cameras train on it all."""
    store = EpisodeStore(tmp_path / "store")
    record_expert_episodes(store, task="pick_cube", episodes=1, seed=1)
    record_expert_episodes(store, task="touch_target", episodes=1, seed=2)
    # An episode from before cameras were declared in the store: only its frames tell.
    legacy = _write_episode(store, "ep-legacy", [GREY] * 20, side=(96, 128), cameras=("front",))
    meta_path = tmp_path / "store" / legacy.path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["cameras"]
    meta_path.write_text(json.dumps(meta))
    store = EpisodeStore(tmp_path / "store")

    wrong = EpisodeSampler(
        store, ("overhead", "wrist"), TASKS, SamplerConfig(batch_size=8, min_steps=1)
    )
    wrong.refresh(force=True)
    assert wrong.without_cameras == 2  # the two declaring theirs; the legacy one when drawn
    assert wrong.last_without_cameras == "cell-t/ep-2-0000: lacks camera wrist; has front, overhead"
    with pytest.raises(RuntimeError, match="lack a camera the model sees"):
        wrong.sample()  # only the legacy episode was left; it has no overhead camera either
    assert wrong.without_cameras == 3 and not wrong.ready()
    assert wrong.quarantined == 0 and not store.quarantined()

    right = EpisodeSampler(store, CAMERAS, TASKS, SamplerConfig(batch_size=8, min_steps=1), seed=3)
    right.refresh(force=True)
    for _ in range(20):
        assert right.sample()["images"].shape == (8, 2, 96, 128, 3)
    assert right.without_cameras == 1  # the legacy episode: the store gives it no cameras
    legacy_why = "cell-bad/ep-legacy: lacks camera overhead, front; has none"
    assert right.last_without_cameras == legacy_why
    assert sorted(right._by_task) == ["pick_cube", "touch_target"]
    assert right.quarantined == 0 and not store.quarantined()


def test_a_cell_with_another_camera_mode_poisons_nothing(tmp_path: Path) -> None:
    """One cell recording 64x48 beside cells at 128x96: its frames are resized to the model's
    input as the model itself would resize them, and nobody's episodes are quarantined,
    whichever episode the sampler happens to index first."""
    store = EpisodeStore(tmp_path / "store")
    record_expert_episodes(store, task="pick_cube", episodes=2, seed=1)
    record_expert_episodes(store, task="touch_target", episodes=1, seed=2)
    grey = np.full((48, 64, 3), 90, np.uint8)
    grey[:, 32:] = 200  # a left/right edge, so a resize that loses the layout shows
    small = simplejpeg.encode_jpeg(grey, colorspace="RGB")
    odd = _write_episode(store, "ep-small", [small] * 20, side=(48, 64), cell_id="a-cell")
    sampler = EpisodeSampler(
        store,
        CAMERAS,
        TASKS,
        SamplerConfig(batch_size=16, min_steps=1, image_size=(96, 128)),
        seed=4,
    )
    sampler.refresh(force=True)
    assert sampler._by_task["pick_cube"][0] == odd  # indexed first, as it once set the size
    odd_rows = 0
    want = resize_images(
        torch.from_numpy(simplejpeg.decode_jpeg(small, colorspace="RGB"))
        .permute(2, 0, 1)[None]
        .float(),
        (96, 128),
    )[0].permute(1, 2, 0)
    for _ in range(30):
        batch = sampler.sample()
        assert batch["images"].shape == (16, 2, 96, 128, 3)
        for row, q in enumerate(batch["joint_pos"]):
            if not q.any():  # the odd cell's rows (its joints are all zero)
                odd_rows += 1
                got = torch.from_numpy(batch["images"][row, 0]).float()
                assert (got - want).abs().max() <= 0.5 + 1e-4  # rounded to uint8, no more
    assert odd_rows > 0
    assert sampler.quarantined == 0 and not store.quarantined()


def test_steps_outside_the_joint_range_are_not_trained_on(tmp_path: Path) -> None:
    """A glitching read drops only the steps it touches (its own, and those whose chunk
    reaches a bad target); a miscalibrated cell's episode drops out whole; nothing else."""
    lower, upper = JOINT_LOWER.astype(np.float64), JOINT_UPPER.astype(np.float64)
    n, k = 40, 10
    q = np.zeros((n, 14))
    a = np.zeros((n, 14))
    a[25, 13] = 1.5  # right gripper target past 1 + 0.25: steps 16..25 reach it
    q[5, 2] = -2.5  # left elbow read at -2.5 (range -1.6..1.6, margin 0.8): step 5 only
    ok, worst = steps_in_range(q, a, np.arange(n), lower, upper, 0.25, k)
    assert sorted(np.flatnonzero(~ok)) == [5, *range(16, 26)]
    assert worst is not None and worst.startswith("left_elbow joint -2.500 at step 5")
    ok, worst = steps_in_range(q[:5], a[:5], np.arange(5), lower, upper, 0.25, k)
    assert ok.all() and worst is None

    store = EpisodeStore(tmp_path / "store")
    record_expert_episodes(store, task="pick_cube", episodes=1, seed=1)
    turned = np.zeros((30, 14), np.float32)
    turned[:, 7] = -2 * np.pi  # right waist a turn off, every step
    bad = _write_episode(store, "ep-turned", [GREY] * 30, side=(96, 128), joints=turned)
    limits = {"joint_lower": tuple(lower), "joint_upper": tuple(upper)}
    sampler = EpisodeSampler(
        store, CAMERAS, TASKS, SamplerConfig(batch_size=8, min_steps=1, **limits), seed=2
    )
    sampler.refresh(force=True)
    assert sampler._by_task["pick_cube"] == [EpisodeRef("cell-t", "ep-1-0000")]
    assert sampler.out_of_range_steps == 30
    assert sampler.last_out_of_range.startswith("cell-bad/ep-turned: right_waist joint -6.283")
    for _ in range(5):
        assert np.abs(sampler.sample()["joint_pos"][:, 7]).max() < 4.5
    assert bad not in store.quarantined() and sampler.quarantined == 0
    # Without the model's range (a sampler not told it), nothing is dropped.
    unchecked = EpisodeSampler(store, CAMERAS, TASKS, SamplerConfig(batch_size=8, min_steps=1))
    unchecked.refresh(force=True)
    assert len(unchecked._by_task["pick_cube"]) == 2 and unchecked.out_of_range_steps == 0

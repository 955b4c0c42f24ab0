"""Kill and restart the trainer: it resumes from its checkpoint (step count, optimizer state,
sampler position, version lineage) and never republishes a step it already published."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from fleet.control.registry import Registry
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.learner_group import get_state_dict
from learner.sampler import SamplerConfig
from learner.store import EpisodeStore
from learner.trainer import Trainer, TrainerConfig
from tests.expert_episodes import CAMERAS, record_expert_episodes

TASKS = ("pick_cube", "touch_target")


def test_checkpoint_roundtrip_keeps_types_and_int_keys(tmp_path: Path) -> None:
    state = {
        "opt": {0: {"step": np.float32(3.0), "exp_avg": np.arange(4, dtype=np.float32)}},
        "groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
        "name": "x",
    }
    save_checkpoint(tmp_path, state)
    save_checkpoint(tmp_path, state)  # replacing an existing checkpoint is atomic too
    back = load_checkpoint(tmp_path)
    assert back is not None
    assert list(back["opt"]) == [0]
    np.testing.assert_array_equal(back["opt"][0]["exp_avg"], np.arange(4, dtype=np.float32))
    assert back["groups"][0]["betas"] == (0.9, 0.999)
    assert load_checkpoint(tmp_path / "none") is None
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def _optimizer_leaves(trainer: Trainer) -> dict[str, Any]:
    opt = trainer.learner_group.get_state()["learner"]["optimizer"]
    (entry,) = opt.values()
    return entry["state"]["state"]


def _run_until(trainer: Trainer, versions: int) -> None:
    trainer.start()
    deadline = time.monotonic() + 60
    while len(trainer.versions) < versions and time.monotonic() < deadline:
        time.sleep(0.1)
    trainer.stop()


def test_trainer_resumes_from_checkpoint_without_republishing(
    tmp_path: Path, redis_server: str, ray_local: None
) -> None:
    store_root = tmp_path / "store"
    record_expert_episodes(EpisodeStore(store_root), task="touch_target", episodes=1, seed=5)
    record_expert_episodes(EpisodeStore(store_root), task="pick_cube", episodes=1, seed=6)
    registry = Registry(redis_server, prefix=f"ck{time.time_ns()}:")
    registry.set_rollout_mode("immediate")
    cfg = TrainerConfig(
        tasks=TASKS,
        cameras=CAMERAS,
        publish_every_updates=5,
        checkpoint_dir=str(tmp_path / "checkpoints"),
        checkpoint_every_updates=1000,
        sampler=SamplerConfig(batch_size=4, min_steps=1),
    )

    def make() -> Trainer:
        return Trainer(
            cfg, store_root, tmp_path / "versions", redis_server, registry_prefix=registry.prefix
        )

    first = make()
    assert not first.resumed
    _run_until(first, versions=1)  # stop() writes the final checkpoint
    updates, sampled = first.updates, first.sampler.limiter.sampled
    opt_before = _optimizer_leaves(first)
    assert updates >= 5 and first.versions[0] == "v0001"

    # "Kill": a fresh Trainer over the same dirs, as after a process restart.
    second = make()
    assert second.resumed
    assert second.updates == updates
    # The action scale measured before the first update is the checkpointed network's.
    scale = first.policy_config.action_scale
    assert len(scale) == 14 and second.policy_config.action_scale == scale
    assert second.versions == first.versions
    assert second.sampler.limiter.sampled == sampled
    opt_after = _optimizer_leaves(second)
    assert opt_after.keys() == opt_before.keys()
    for key, slot in opt_before.items():
        assert float(opt_after[key]["step"]) == float(slot["step"]) > 0
        np.testing.assert_array_equal(
            np.asarray(opt_after[key]["exp_avg"]), np.asarray(slot["exp_avg"])
        )
        np.testing.assert_array_equal(
            np.asarray(opt_after[key]["exp_avg_sq"]), np.asarray(slot["exp_avg_sq"])
        )
    w1, w2 = get_state_dict(first.learner_group), get_state_dict(second.learner_group)
    for k, v in w1.items():
        np.testing.assert_array_equal(v.numpy(), w2[k].numpy())

    _run_until(second, versions=len(first.versions) + 1)
    ids = [v.version_id for v in registry.versions()]
    assert len(ids) == len(set(ids)), f"a version id was published twice: {ids}"
    assert all(
        v.manifest["model_config"]["action_scale"] == list(scale) for v in registry.versions()
    )
    steps = [int(v.manifest.get("training_step", 0)) for v in registry.versions()]
    assert second.versions[-1] != first.versions[-1]
    assert second.updates > updates
    assert len(steps) == len(set(steps)), f"a training step was published twice: {steps}"

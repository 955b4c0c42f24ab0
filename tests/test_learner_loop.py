"""The learner's own loop: the sampler reads the growing store, the trainer updates through
RLlib, and the publisher turns weights into registered, loadable versions."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fleet.common.policy.manifest import Manifest
from fleet.common.policy.weights import load_version
from fleet.control.registry import Registry
from fleet.control.status_view import render
from learner.sampler import EpisodeSampler, SamplerConfig
from learner.store import EpisodeStore
from learner.trainer import Trainer, TrainerConfig
from tests.expert_episodes import CAMERAS, record_expert_episodes
from tests.waiting import wait_for

TASKS = ("pick_cube", "touch_target")


def test_sampler_sees_new_episodes_and_balances_tasks(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path / "store")
    sampler = EpisodeSampler(store, CAMERAS, TASKS, SamplerConfig(batch_size=64, min_steps=1))
    assert not sampler.ready()
    record_expert_episodes(store, task="pick_cube", episodes=3, seed=1)
    record_expert_episodes(store, task="touch_target", episodes=1, seed=2)
    assert sampler.refresh(force=True) == 4
    batch = sampler.sample()
    assert batch["images"].shape == (64, 2, 96, 128, 3)
    assert batch["actions"].shape == (64, 10, 14)
    share = float(np.mean(batch["task_id"] == TASKS.index("touch_target")))
    assert 0.3 < share < 0.7, "one task with fewer episodes must still get about half the batch"
    # Chunks running past the episode end are padded and masked, never read out of range.
    assert (batch["action_mask"].sum(axis=1) >= 1).all()
    assert set(np.unique(batch["weight"])) == {2.0}  # every expert step is an intervention


def test_rate_limiter_throttles_the_trainer_not_ingest(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path / "store")
    cfg = SamplerConfig(batch_size=32, min_steps=1, max_samples_per_insert=2.0)
    sampler = EpisodeSampler(store, CAMERAS, TASKS, cfg)
    steps = record_expert_episodes(store, task="touch_target", episodes=1, seed=3)
    sampler.refresh(force=True)
    drawn = 0
    while sampler.ready():
        sampler.sample()
        drawn += cfg.batch_size
    assert drawn <= 2.0 * steps < drawn + cfg.batch_size
    # New data (ingest never waited) lets training continue.
    record_expert_episodes(store, task="touch_target", episodes=1, seed=4)
    sampler.refresh(force=True)
    assert sampler.ready()


def _trainer(tmp_path: Path, redis_server: str, **config: Any) -> tuple[Registry, Trainer]:
    """A trainer on TASKS over tmp_path/store with the suite's small batches, publishing to
    a fresh registry prefix with immediate rollout; `config` sets TrainerConfig fields."""
    registry = Registry(redis_server, prefix=f"t{time.time_ns()}:")
    registry.set_rollout_mode("immediate")
    cfg = TrainerConfig(
        tasks=TASKS,
        cameras=CAMERAS,
        sampler=SamplerConfig(batch_size=8, min_steps=1),
        **config,
    )
    store_root, versions = tmp_path / "store", tmp_path / "versions"
    trainer = Trainer(cfg, store_root, versions, redis_server, registry_prefix=registry.prefix)
    return registry, trainer


def test_trainer_publishes_loadable_versions_and_registers_them(
    tmp_path: Path, redis_server: str, ray_local: None
) -> None:
    store_root = tmp_path / "store"
    record_expert_episodes(EpisodeStore(store_root), task="touch_target", episodes=2, seed=5)
    record_expert_episodes(EpisodeStore(store_root), task="pick_cube", episodes=2, seed=6)
    registry, trainer = _trainer(tmp_path, redis_server, publish_every_updates=10)
    trainer.start()
    deadline = time.monotonic() + 60
    while len(trainer.versions) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    trainer.stop()
    assert trainer.versions[:2] == ["v0001", "v0002"]
    versions = registry.versions()
    assert [v.version_id for v in versions][:2] == ["v0001", "v0002"]
    assert registry.rollout().stable == trainer.versions[-1]
    second = Manifest.from_json(Path(versions[1].weights_path).with_suffix(".json").read_text())
    assert second.parent == "v0001" and second.training_step == 20
    weights = Path(versions[1].weights_path).read_bytes()
    model = load_version(weights, second)
    assert model.config.tasks == TASKS
    stats = registry.learner_stats()
    assert stats["updates"] >= 20 and np.isfinite(float(stats["loss"]))


def test_version_ids_continue_the_checkpointed_lineage_on_a_fresh_registry(
    tmp_path: Path, redis_server: str
) -> None:
    from learner.publisher import Publisher

    registry = Registry(redis_server, prefix=f"fresh{time.time_ns()}:")
    publisher = Publisher(registry, tmp_path / "versions")
    assert publisher.next_version_id() == "v0001"
    # A learner resumed from a checkpoint that had published v0001..v0003 elsewhere.
    assert publisher.next_version_id(["v0001", "v0002", "v0003"]) == "v0004"


def _touch_target_only(
    tmp_path: Path, redis_server: str, wait_s: float, publish_every: int
) -> tuple[Path, Registry, Trainer]:
    """A trainer on TASKS over a store holding touch_target episodes only."""
    store_root = tmp_path / "store"
    record_expert_episodes(EpisodeStore(store_root), task="touch_target", episodes=2, seed=7)
    registry, trainer = _trainer(
        tmp_path, redis_server, publish_every_updates=publish_every, action_scale_wait_s=wait_s
    )
    return store_root, registry, trainer


def test_action_scale_waits_for_every_task_then_measures_them_all(
    tmp_path: Path, redis_server: str, ray_local: None
) -> None:
    """A task with no episode yet at the first update would leave its joints at the floor
    scale: the first update waits for it (and says so), then measures on every task."""
    store_root, registry, trainer = _touch_target_only(tmp_path, redis_server, 600.0, 5)
    trainer.start()
    try:
        wait_for(
            lambda: str(registry.learner_stats().get("trainer_state", "")).endswith("pick_cube"),
            60.0,
            "the trainer to say it waits for pick_cube",
        )
        assert trainer.updates == 0
        record_expert_episodes(EpisodeStore(store_root), task="pick_cube", episodes=2, seed=8)
        wait_for(lambda: trainer.versions, 120.0, "a first version")
    finally:
        trainer.stop()
    sampler = EpisodeSampler(EpisodeStore(store_root), CAMERAS, TASKS, SamplerConfig(min_steps=1))
    sampler.refresh(force=True)
    cfg_scale = trainer.policy_config
    want = sampler.action_scale(cfg_scale.joint_lower, cfg_scale.joint_upper)
    assert np.allclose(cfg_scale.action_scale, want)
    first = registry.versions()[0]
    manifest = Manifest.from_json(Path(first.weights_path).with_suffix(".json").read_text())
    assert np.allclose(manifest.model_config["action_scale"], want)


def test_action_scale_stops_waiting_after_its_limit(
    tmp_path: Path, redis_server: str, ray_local: None, caplog
) -> None:
    _, _, trainer = _touch_target_only(tmp_path, redis_server, 0.5, 1000)
    with caplog.at_level(logging.WARNING, logger="learner.trainer"):
        trainer.start()
        try:
            wait_for(lambda: trainer.updates > 0, 60.0, "a first update")
        finally:
            trainer.stop()
    assert "no episode of pick_cube" in caplog.text
    assert trainer.policy_config.action_scale  # measured, on touch_target alone


def test_first_version_waits_for_demonstrations_of_every_task(
    tmp_path: Path, redis_server: str, ray_local: None
) -> None:
    """With first_version_demos the trainer trains on but publishes nothing (so the cells'
    operators keep demonstrating) until every task has that many episodes an operator drove
    whole; takeover episodes do not count. Then the first version follows at once."""
    store_root = tmp_path / "store"
    store = EpisodeStore(store_root)
    record_expert_episodes(store, task="pick_cube", episodes=2, seed=9)
    record_expert_episodes(store, task="touch_target", episodes=1, seed=10)
    record_expert_episodes(store, task="touch_target", episodes=2, seed=11, policy_first=5)
    registry, trainer = _trainer(
        tmp_path, redis_server, publish_every_updates=5, first_version_demos=2
    )
    trainer.start()
    try:
        wait_for(
            lambda: (
                "demonstrations: touch_target 1/2"
                in str(registry.learner_stats().get("trainer_state", ""))
            ),
            60.0,
            "the trainer to say the first version waits for touch_target",
        )
        wait_for(lambda: trainer.updates >= 12, 60.0, "training to go on while it waits")
        assert not trainer.versions and not registry.versions()
        console = Console(width=250, record=True)
        console.print(render(registry))  # what `fleet status` shows the operators
        waits = [x for x in console.export_text().splitlines() if "first version waits" in x]
        # Only the task still short is named (pick_cube has its 2).
        assert waits and waits[0].strip().endswith("demonstrations: touch_target 1/2"), waits
        record_expert_episodes(store, task="touch_target", episodes=1, seed=12)
        wait_for(lambda: trainer.versions, 120.0, "the first version")
    finally:
        trainer.stop()
    first = registry.versions()[0]
    manifest = Manifest.from_json(Path(first.weights_path).with_suffix(".json").read_text())
    assert first.version_id == "v0001" and manifest.training_step >= 12


def _draw_at_the_end(sampler: EpisodeSampler, last_q: np.ndarray) -> tuple:
    """(actions, mask) of a row drawn at the step whose joints are `last_q` (an episode's
    last), sampling batches until one holds it."""
    for _ in range(200):
        batch = sampler.sample()
        at = np.flatnonzero((batch["joint_pos"] == last_q).all(axis=1))
        if len(at):
            return batch["actions"][at[0]], batch["action_mask"][at[0]]
    raise AssertionError("the last step was never drawn in 200 batches")


def test_hold_after_success_trains_the_end_of_successful_episodes_only(tmp_path: Path) -> None:
    """Past an episode's end chunk targets are masked by default; with hold_after_success
    those of an episode that succeeded hold its last action and are trained on, while one cut
    short by its time limit stays masked (what came next is unknown)."""
    store = EpisodeStore(tmp_path / "store")
    record_expert_episodes(store, task="pick_cube", episodes=1, seed=5)
    record_expert_episodes(store, task="touch_target", episodes=1, seed=6, max_steps=6)
    by_task = {}
    for ref in store.episodes(complete_only=True):
        data = store.read_episode(ref, frames=False)
        by_task[data.attrs["task"]] = data
    done, cut = by_task["pick_cube"], by_task["touch_target"]
    assert done.attrs["outcome"]["success"] and not cut.attrs["outcome"]["success"]
    k = 10
    assert not SamplerConfig().hold_after_success
    for hold in (True, False):
        cfg = SamplerConfig(batch_size=64, min_steps=1, chunk_len=k, hold_after_success=hold)
        sampler = EpisodeSampler(store, CAMERAS, TASKS, cfg, seed=1)
        sampler.refresh(force=True)
        actions, mask = _draw_at_the_end(sampler, done.joint_pos[-1])
        assert np.array_equal(actions, np.repeat(done.action[-1:], k, axis=0))
        assert mask.tolist() == ([1.0] * k if hold else [1.0] + [0.0] * (k - 1))
        actions, mask = _draw_at_the_end(sampler, cut.joint_pos[-1])
        assert mask.tolist() == [1.0] + [0.0] * (k - 1), "a cut episode's future is unknown"

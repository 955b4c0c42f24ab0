"""Training the unified policy through RLlib's LearnerGroup, fed by our own numpy batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.learner_group import LearnerGroup

from fleet.common.policy.config import PolicyConfig, policy_config
from fleet.common.policy.model import UnifiedPolicy
from learner.learner_group import (
    build_learner_group,
    get_state_dict,
    policy_from_learner_group,
    set_state_dict,
    update,
)

TASKS = ("pick_cube", "touch_target")
CAMERAS = ("overhead", "left_wrist")
CHUNK = 5


@pytest.fixture(scope="module")
def cfg() -> PolicyConfig:
    return policy_config("tiny", TASKS, CAMERAS, chunk_len=CHUNK)


@pytest.fixture(scope="module")
def local_group(ray_local: None, cfg: PolicyConfig) -> Iterator[LearnerGroup]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    group = build_learner_group(cfg, lr=1e-3)
    yield group
    group.shutdown()


def synthetic_batch(b: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Learnable data: each task moves every joint a fixed way from the current pose."""
    rng = np.random.default_rng(seed)
    lower = np.asarray(policy_config("tiny", TASKS, CAMERAS).joint_lower, np.float32)
    upper = np.asarray(policy_config("tiny", TASKS, CAMERAS).joint_upper, np.float32)
    joint_norm = rng.uniform(-0.5, 0.5, (b, 14)).astype(np.float32)
    task_id = rng.integers(0, len(TASKS), b).astype(np.int64)
    direction = rng.choice([-0.6, 0.6], size=(len(TASKS), 14)).astype(np.float32)
    ramp = (np.arange(1, CHUNK + 1, dtype=np.float32) / CHUNK)[None, :, None]
    target_norm = joint_norm[:, None, :] + direction[task_id][:, None, :] * ramp

    def rad(x: np.ndarray) -> np.ndarray:
        return (lower + (x + 1.0) * 0.5 * (upper - lower)).astype(np.float32)

    mask = np.ones((b, CHUNK), np.float32)
    mask[:3, 3:] = 0.0  # three samples near an episode's end
    return {
        "images": rng.integers(0, 256, (b, len(CAMERAS), 24, 32, 3), dtype=np.uint8),
        "joint_pos": rad(joint_norm),
        "task_id": task_id,
        "actions": rad(target_norm),
        "action_mask": mask,
        "weight": np.where(rng.random(b) < 0.25, 3.0, 1.0).astype(np.float32),
    }


def _first(results: Any) -> Any:
    """The first learner's answer from LearnerGroup.foreach_learner."""
    return next(iter(results)).get()


def _learner_policy_state(group: LearnerGroup) -> dict[str, np.ndarray]:
    def fetch(learner: Any) -> dict[str, np.ndarray]:
        policy = learner.module[DEFAULT_MODULE_ID].unwrapped().policy
        return {k: v.detach().cpu().numpy().copy() for k, v in policy.state_dict().items()}

    return _first(group.foreach_learner(fetch))


def test_loss_halves_within_100_updates_through_the_learner_group(
    local_group: LearnerGroup,
) -> None:
    batch = synthetic_batch()
    first = update(local_group, batch)
    assert {"loss", "abs_err_rad"} <= set(first)
    losses = [first["loss"]] + [update(local_group, batch)["loss"] for _ in range(99)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_state_dict_matches_the_learners_module(
    local_group: LearnerGroup, cfg: PolicyConfig
) -> None:
    update(local_group, synthetic_batch(seed=1))
    state = get_state_dict(local_group)
    assert set(state) == set(UnifiedPolicy(cfg).state_dict())
    inside = _learner_policy_state(local_group)
    assert set(inside) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(value.numpy(), inside[key], err_msg=key)

    # A standalone model with these weights predicts what the learner's module predicts.
    model = policy_from_learner_group(local_group, cfg)
    batch = synthetic_batch(b=2, seed=2)
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}

    def infer(learner: Any) -> np.ndarray:
        module = learner.module[DEFAULT_MODULE_ID].unwrapped()
        module.eval()
        try:
            return module.forward_inference(tensors)["actions"].detach().cpu().numpy()
        finally:
            module.train()

    expected = _first(local_group.foreach_learner(infer))
    with torch.no_grad():
        got = model(tensors["images"], tensors["joint_pos"], tensors["task_id"]).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_set_state_dict_round_trips_and_rejects_other_architectures(
    local_group: LearnerGroup,
) -> None:
    torch.manual_seed(7)
    fresh = UnifiedPolicy(policy_config("tiny", TASKS, CAMERAS, chunk_len=CHUNK)).state_dict()
    set_state_dict(local_group, fresh)
    for key, value in get_state_dict(local_group).items():
        assert torch.equal(value, fresh[key]), key
    other = UnifiedPolicy(policy_config("tiny", TASKS, CAMERAS, chunk_len=CHUNK + 1)).state_dict()
    with pytest.raises(ValueError, match="queries"):
        set_state_dict(local_group, other)


def test_update_rejects_incomplete_batches(local_group: LearnerGroup) -> None:
    batch = synthetic_batch()
    del batch["action_mask"]
    with pytest.raises(ValueError, match="action_mask"):
        update(local_group, batch)


def test_remote_learner_weights_come_back_as_writable_tensors(
    ray_local: None, cfg: PolicyConfig
) -> None:
    group = build_learner_group(cfg, lr=1e-3, num_learners=1)
    try:
        assert update(group, synthetic_batch())["loss"] > 0
        state = get_state_dict(group)
        assert set(state) == set(UnifiedPolicy(cfg).state_dict())
        for value in state.values():
            assert isinstance(value, torch.Tensor)
            value.add_(0)  # read-only numpy from the actor would make this fail
        model = UnifiedPolicy(cfg)
        model.load_state_dict(state)
        set_state_dict(group, model.state_dict())
    finally:
        group.shutdown()

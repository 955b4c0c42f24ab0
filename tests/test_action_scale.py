"""Per-joint action scale: measured on the data, carried by the manifest, weighing the loss.

Why it matters: in joint-limit units a gripper's chunk moves ~0.5 while an arm joint moves
~0.02, so without a scale the head fits the arm joints, which decide where the gripper ends
up, twenty times more coarsely than the gripper.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fleet.common.policy.config import PolicyConfig
from fleet.common.policy.weights import load_version, save_version
from learner.chunks import CameraColumn, DecodedChunk
from learner.sampler import EpisodeSampler, SamplerConfig
from learner.store import EpisodeStore
from protos.joint_layout import JOINT_DIM, JOINT_LOWER, JOINT_UPPER
from tests.test_policy_model import (
    CAMERAS,
    inputs,
    make_model,
    manifest_for,
    perturb,
    tiny,
)

SCALE = tuple(0.02 if j % 7 != 6 else 0.5 for j in range(JOINT_DIM))


def test_config_carries_the_scale_and_refuses_a_bad_one() -> None:
    cfg = tiny(action_scale=SCALE)
    again = PolicyConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.action_scale == SCALE
    for bad in ((1.0,) * (JOINT_DIM - 1), (0.0,) * JOINT_DIM, (float("nan"),) * JOINT_DIM):
        with pytest.raises(ValueError, match="action_scale"):
            tiny(action_scale=bad)


def test_a_manifest_without_the_scale_rebuilds_the_unscaled_network() -> None:
    old = tiny().to_dict()
    old.pop("action_scale")
    cfg = PolicyConfig.from_dict(old)
    assert cfg.action_scale == ()
    model = make_model()
    assert torch.equal(model.action_scale, torch.ones(JOINT_DIM))


def test_head_outputs_are_in_scale_units_and_an_untrained_model_holds_still() -> None:
    images, joints, task_id = inputs()
    torch.manual_seed(0)
    held = make_model(action_scale=SCALE).eval()
    assert torch.allclose(held(images, joints, task_id), joints[:, None].expand(-1, 5, -1))
    plain = perturb(make_model(seed=1)).eval()
    scaled = make_model(seed=1, action_scale=SCALE).eval()
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        base = plain.normalize_joints(joints)[:, None]
        offset_plain = plain.forward_normalized(images, joints, task_id) - base
        offset_scaled = scaled.forward_normalized(images, joints, task_id) - base
    assert torch.allclose(offset_scaled, offset_plain * torch.tensor(SCALE), atol=1e-6)


def test_loss_weighs_each_joint_by_its_scale() -> None:
    """The same error costs 25 times more on a joint whose scale is 25 times smaller."""
    model = make_model(action_scale=SCALE)
    images, joints, task_id = inputs(b=2)
    with torch.no_grad():
        predicted = model.forward_normalized(images, joints, task_id)
    exact = model.denormalize_joints(predicted)

    def loss_with_error_on(joint: int) -> float:
        actions = exact.clone()
        normalised = model.normalize_joints(actions)
        normalised[..., joint] += 0.01
        batch = {
            "images": images,
            "joint_pos": joints,
            "task_id": task_id,
            "actions": model.denormalize_joints(normalised),
        }
        return float(model.bc_loss(batch, predicted)[0])

    arm, gripper = loss_with_error_on(0), loss_with_error_on(6)
    assert arm == pytest.approx(25.0 * gripper, rel=1e-3)
    assert arm == pytest.approx(0.01 / 0.02 / JOINT_DIM, rel=1e-3)


def test_a_published_version_keeps_its_scale(tmp_path: Path) -> None:
    model = perturb(make_model(seed=2, action_scale=SCALE))
    manifest = manifest_for(model)
    weights_path, _ = save_version(tmp_path, model, manifest)
    loaded = load_version(weights_path.read_bytes(), manifest)
    assert loaded.config.action_scale == SCALE
    images, joints, task_id = inputs()
    assert torch.equal(loaded(images, joints, task_id), model.eval()(images, joints, task_id))


def _chunk(name: str, q: np.ndarray, action: np.ndarray) -> DecodedChunk:
    n = len(q)
    jpeg = b"\xff\xd8\xff\xd9"  # never decoded: the scale reads joint columns only
    return DecodedChunk(
        cell_id="cell-a",
        episode_id=name,
        seq=0,
        first_step=0,
        task="pick_cube",
        policy_version="",
        timestamp=np.arange(n, dtype=np.float64) * 0.05,
        joint_pos=q.astype(np.float32),
        action=action.astype(np.float32),
        intervention=np.ones(n, bool),
        reward=np.zeros(n, np.float32),
        cameras={"overhead": CameraColumn("overhead", "jpeg", 8, 8, 3, [jpeg] * n)},
        last=True,
        outcome={"success": True, "reason": "success", "started_at": 0.0, "ended_at": 1.0},
    )


def test_the_sampler_measures_the_scale_from_joint_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = EpisodeStore(tmp_path / "store")
    episodes = []
    for e in range(3):
        n = 15 + 4 * e
        q = np.zeros((n, JOINT_DIM))
        q[:, 1] = np.cumsum(rng.normal(0, 0.05, n))  # an arm joint that wanders
        q[:, 6] = 0.5 + 0.4 * np.sign(np.sin(np.arange(n) / 3.0))  # a gripper that snaps
        action = np.roll(q, -1, axis=0)  # each step commands the next position
        action[-1] = q[-1]
        store.append(_chunk(f"ep-{e}", q, action))
        episodes.append((q, action))
    k = 4
    cfg = SamplerConfig(min_steps=1, chunk_len=k)
    sampler = EpisodeSampler(store, CAMERAS[:1], ("pick_cube",), cfg)
    sampler.refresh(force=True)
    got = np.array(sampler.action_scale(JOINT_LOWER, JOINT_UPPER, floor=0.01))

    span = (JOINT_UPPER - JOINT_LOWER).astype(np.float64)
    squares, count = np.zeros(JOINT_DIM), 0
    for q, action in episodes:  # the definition, step by step
        for t in range(len(q)):
            for dk in range(k):
                off = (action[min(t + dk, len(q) - 1)] - q[t]) * 2.0 / span
                squares += off**2
                count += 1
    want = np.maximum(0.01, np.sqrt(squares / count))
    assert np.allclose(got, want, rtol=1e-5)
    assert got[6] > 10 * got[1] > 0.01  # the gripper's scale dwarfs the arm joint's
    assert got[0] == 0.01  # a joint that never moves gets the floor

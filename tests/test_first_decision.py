"""ops/first_decision.py: per joint, does a model's chunk head where each scene's
demonstration goes? Checked against the two models whose answer is known: one that holds
still (an untrained head) and one that knows every demonstration (an oracle)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fleet.common.policy.config import policy_config
from fleet.common.policy.model import UnifiedPolicy
from learner.sampler import decode_jpegs
from learner.store import EpisodeStore
from ops.first_decision import probe
from protos.joint_layout import JOINT_NAMES
from tests.expert_episodes import CAMERAS, record_expert_episodes

TASKS = ("pick_cube", "touch_target")
STEPS = (0, 3)


class _Oracle(UnifiedPolicy):
    """Answers each stored observation (its frames: every scene starts from the same joint
    positions) with its demonstration's own chunk."""

    answers: dict[bytes, np.ndarray]

    def forward(self, images: Tensor, joint_pos: Tensor, task_id: Tensor) -> Tensor:
        rows = [self.answers[_key(im.numpy())] for im in images]
        return torch.from_numpy(np.stack(rows))


def _key(images: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).digest()


def _store(tmp_path: Path) -> EpisodeStore:
    store = EpisodeStore(tmp_path / "store")
    record_expert_episodes(store, task="pick_cube", episodes=4, seed=3)
    record_expert_episodes(store, task="touch_target", episodes=2, seed=4)
    return store


def test_a_model_that_holds_still_scores_as_holding_still(tmp_path: Path) -> None:
    store = _store(tmp_path)
    model = UnifiedPolicy(policy_config("tiny", TASKS, CAMERAS))  # zero head: hold
    out = probe(model, store, "pick_cube", STEPS)
    assert out["episodes"] == 4  # the touch_target demonstrations are not counted
    moving = 0
    for step in map(str, STEPS):
        for name in JOINT_NAMES:
            f = out["steps"][step][name]
            assert f["model_std"] < 1e-4 and f["corr"] is None
            assert abs(f["err"] - f["hold_err"]) < 1e-4
            moving += f["demo_std"] > 1e-3
    assert moving, "the expert's demonstrations must differ between scenes somewhere"


def test_an_oracle_follows_every_scene(tmp_path: Path) -> None:
    store = _store(tmp_path)
    model = _Oracle(policy_config("tiny", TASKS, CAMERAS))
    k = model.config.chunk_len
    model.answers = {}
    for ref in store.episodes():
        ep = store.read_episode(ref)
        a = np.asarray(ep.action, np.float32)
        for t in STEPS:
            images = np.stack(decode_jpegs([ep.frames[c][t] for c in CAMERAS]))
            model.answers[_key(images)] = a[np.minimum(np.arange(t, t + k), len(a) - 1)]
    out = probe(model, store, "pick_cube", STEPS)
    for step in map(str, STEPS):
        for name in JOINT_NAMES:
            f = out["steps"][step][name]
            assert f["err"] < 1e-5
            if f["demo_std"] > 1e-3:
                assert f["corr"] is not None and f["corr"] > 0.999

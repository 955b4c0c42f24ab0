"""Build and drive the RLlib LearnerGroup that trains the unified policy from our own batches.

Our sampler feeds numpy batches straight into LearnerGroup.update: RLlib's env runners and
offline readers do not fit a live fleet (DESIGN, "Learner on Ray"). num_learners=0 trains in
this process; more learners shard each batch and all-reduce gradients (DDP), one per GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.learner.learner_group import LearnerGroup
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from fleet.common.policy.config import PolicyConfig
from fleet.common.policy.model import UnifiedPolicy
from learner.bc_learner import BCTorchLearner
from learner.rl_module import UnifiedPolicyModule

log = logging.getLogger(__name__)

BATCH_KEYS = ("images", "joint_pos", "task_id", "actions", "action_mask", "weight")
_PREFIX = "policy."  # UnifiedPolicyModule keeps the network under `.policy`


def observation_space(policy_cfg: PolicyConfig) -> gym.spaces.Box:
    """Nominal: the joint positions only (images and task travel in the batch dict)."""
    lower = np.asarray(policy_cfg.joint_lower, np.float32)
    upper = np.asarray(policy_cfg.joint_upper, np.float32)
    return gym.spaces.Box(lower, upper, dtype=np.float32)


def action_space(policy_cfg: PolicyConfig) -> gym.spaces.Box:
    """A chunk of K joint targets within the joint limits."""
    k = policy_cfg.chunk_len
    lower = np.tile(np.asarray(policy_cfg.joint_lower, np.float32), (k, 1))
    upper = np.tile(np.asarray(policy_cfg.joint_upper, np.float32), (k, 1))
    return gym.spaces.Box(lower, upper, dtype=np.float32)


def build_learner_group(
    policy_cfg: PolicyConfig,
    *,
    lr: float = 3e-4,
    num_learners: int = 0,
    num_gpus_per_learner: float = 0,
) -> LearnerGroup:
    """A LearnerGroup whose learners run BCTorchLearner on a UnifiedPolicyModule."""
    config = (
        AlgorithmConfig()
        .framework("torch")
        .training(lr=lr)
        .learners(
            num_learners=num_learners,
            num_gpus_per_learner=num_gpus_per_learner,
            learner_class=BCTorchLearner,
        )
    )
    spec = RLModuleSpec(
        module_class=UnifiedPolicyModule,
        # RLlib insists on spaces; the module ignores them (it reads the PolicyConfig).
        observation_space=observation_space(policy_cfg),
        action_space=action_space(policy_cfg),
        model_config={"policy_config": policy_cfg.to_dict()},
    )
    group = config.build_learner_group(rl_module_spec=spec)
    log.info(
        "learner group ready: preset %s, %d learner(s), %.2f GPU each, lr %g",
        policy_cfg.preset,
        num_learners,
        num_gpus_per_learner,
        lr,
    )
    return group


def _check_batch(batch: Mapping[str, np.ndarray]) -> int:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"training batch lacks {missing}; it needs {list(BATCH_KEYS)}")
    sizes = {k: len(batch[k]) for k in BATCH_KEYS}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"training batch arrays disagree on batch size: {sizes}")
    return sizes["images"]


def _scalar(value: Any) -> float | None:
    """A metric leaf (Stats object, tensor, numpy or python number) as a float."""
    if hasattr(value, "peek"):
        value = value.peek()
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return float(value) if value.numel() == 1 else None
    if isinstance(value, np.ndarray | np.generic):
        return float(value) if np.size(value) == 1 else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def update(learner_group: LearnerGroup, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """One gradient step on a sampler batch; returns the module's metrics ("loss", ...).

    With several learners the batch is split between them (DDP keeps their weights equal)
    and their metrics are combined.
    """
    size = _check_batch(batch)
    sample = SampleBatch({k: np.asarray(batch[k]) for k in BATCH_KEYS})
    results = learner_group.update(
        batch=MultiAgentBatch({DEFAULT_MODULE_ID: sample}, env_steps=size)
    )
    per_learner = results if isinstance(results, list) else [results]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for result in per_learner:
        module_metrics = result.get(DEFAULT_MODULE_ID, {}) if isinstance(result, dict) else {}
        for key, leaf in module_metrics.items():
            value = _scalar(leaf)
            if value is None:
                continue
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    # Counters ("num_...") add up over learners; losses and rates are averaged.
    metrics = {k: sums[k] if k.startswith("num_") else sums[k] / counts[k] for k in sums}
    if "loss" not in metrics:
        raise RuntimeError(f"learner results carry no loss: {per_learner!r}"[:500])
    return metrics


def _to_tensor(value: Any) -> torch.Tensor:
    # Remote learners hand weights back as read-only numpy arrays; copy into owned tensors.
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").clone()
    return torch.from_numpy(np.array(value, copy=True))


def get_state_dict(learner_group: LearnerGroup) -> dict[str, torch.Tensor]:
    """The UnifiedPolicy's weights (keys as in UnifiedPolicy.state_dict()), as CPU tensors."""
    weights = learner_group.get_weights(module_ids=[DEFAULT_MODULE_ID])[DEFAULT_MODULE_ID]
    state = {k[len(_PREFIX) :]: _to_tensor(v) for k, v in weights.items() if k.startswith(_PREFIX)}
    if len(state) != len(weights):
        odd = sorted(k for k in weights if not k.startswith(_PREFIX))
        raise RuntimeError(f"learner module has weights outside the policy: {odd[:5]}")
    return state


def set_state_dict(learner_group: LearnerGroup, state: Mapping[str, torch.Tensor]) -> None:
    """Load UnifiedPolicy weights into every learner (e.g. resume from a published version)."""
    current = get_state_dict(learner_group)
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    wrong = sorted(k for k in current if k in state and tuple(state[k].shape) != current[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"state does not match the learner's policy: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    weights = {_PREFIX + k: v.detach().to("cpu").numpy() for k, v in state.items()}
    learner_group.set_weights({DEFAULT_MODULE_ID: weights})


def policy_from_learner_group(
    learner_group: LearnerGroup, policy_cfg: PolicyConfig
) -> UnifiedPolicy:
    """A standalone UnifiedPolicy carrying the learners' current weights (eval mode)."""
    model = UnifiedPolicy(policy_cfg)
    model.load_state_dict(get_state_dict(learner_group), strict=True)
    return model.eval()

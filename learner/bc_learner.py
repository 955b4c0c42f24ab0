"""The behaviour-cloning loss as an RLlib TorchLearner.

The loss itself is UnifiedPolicy.bc_loss (plain torch, shared with tests and tools); this
class only plugs it into RLlib's update loop and metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.rllib.core.learner.torch.torch_learner import TorchLearner

from learner.rl_module import PRED_NORMALIZED, UnifiedPolicyModule

if TYPE_CHECKING:
    import torch
    from ray.rllib.algorithms.algorithm_config import AlgorithmConfig


class BCTorchLearner(TorchLearner):
    """Masked, weighted L1 on action chunks; logs "loss" and friends per module."""

    def compute_loss_for_module(
        self,
        *,
        module_id: str,
        config: AlgorithmConfig,
        batch: dict[str, Any],
        fwd_out: dict[str, Any],
    ) -> torch.Tensor:
        module = self.module[module_id].unwrapped()
        if not isinstance(module, UnifiedPolicyModule):
            raise TypeError(f"module {module_id!r} is {type(module).__name__}, not a policy")
        loss, metrics = module.policy.bc_loss(batch, predicted=fwd_out[PRED_NORMALIZED])
        self.metrics.log_dict(metrics, key=module_id, window=1)
        return loss

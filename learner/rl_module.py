"""A thin RLlib TorchRLModule around the plain-torch UnifiedPolicy.

RLlib's default encoders build from observation spaces and reject our dict observation
(several cameras, joints, a task id), so the module builds the UnifiedPolicy itself from the
PolicyConfig carried in model_config. The network stays in fleet/common/policy so the edge runs it
without Ray; its weights here live under the `policy.` prefix.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.core.rl_module.torch import TorchRLModule

from fleet.common.policy.config import PolicyConfig
from fleet.common.policy.model import UnifiedPolicy

# Key of the normalised action chunk in forward_train's output (what BCTorchLearner reads).
PRED_NORMALIZED = "action_pred_normalized"


class UnifiedPolicyModule(TorchRLModule):
    """model_config={"policy_config": PolicyConfig.to_dict()}; spaces may be None."""

    policy: UnifiedPolicy

    def setup(self) -> None:
        model_config = self.model_config or {}
        if "policy_config" not in model_config:
            raise ValueError(
                "UnifiedPolicyModule needs model_config={'policy_config': PolicyConfig.to_dict()}"
            )
        self.policy = UnifiedPolicy(PolicyConfig.from_dict(model_config["policy_config"]))

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Inference: the joint-target chunk in radians under "actions"."""
        return {"actions": self.policy(batch["images"], batch["joint_pos"], batch["task_id"])}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        pred = self.policy.forward_normalized(batch["images"], batch["joint_pos"], batch["task_id"])
        return {PRED_NORMALIZED: pred}

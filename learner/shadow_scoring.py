"""Shadow evaluation scores: how far a shadow version's actions are from what was executed.

A cell running a candidate in shadow infers with it on the same observations as the acting
version and uploads its actions beside the executed ones (StepChunk.shadow_action). On steps
the acting (stable) version drove, the distance says how differently the candidate would have
acted; on steps an operator drove (interventions), it says how close the candidate comes to
what a human did where stable needed help, the more telling of the two.

The distance of one step is the root mean square over the 14 joint targets, in radians (the
gripper values are in their own normalised units; they are few enough not to dominate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from learner.chunks import DecodedChunk


@dataclass(frozen=True)
class ShadowScore:
    version: str
    steps: int
    dist_stable_sum: float  # summed over steps the acting version drove
    operator_steps: int
    dist_operator_sum: float  # summed over intervention steps

    def as_registry_fields(self) -> dict[str, float | int | str]:
        return {
            "version": self.version,
            "steps": self.steps,
            "dist_stable_sum": self.dist_stable_sum,
            "operator_steps": self.operator_steps,
            "dist_operator_sum": self.dist_operator_sum,
        }


def shadow_score(chunk: DecodedChunk) -> ShadowScore | None:
    """The chunk's shadow distances, or None when it carries no shadow actions."""
    shadow = chunk.shadow_action
    if shadow is None or not chunk.shadow_version:
        return None
    per_step = np.sqrt(np.mean((shadow - chunk.action) ** 2, axis=1))
    operator = chunk.intervention
    return ShadowScore(
        version=chunk.shadow_version,
        steps=int((~operator).sum()),
        dist_stable_sum=float(per_step[~operator].sum()),
        operator_steps=int(operator.sum()),
        dist_operator_sum=float(per_step[operator].sum()),
    )

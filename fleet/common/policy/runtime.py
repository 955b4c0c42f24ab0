"""Edge inference: one observation in, a chunk of joint targets out.

The control loop calls this between ticks, so it is CPU, no autograd, one sample, and it
checks its inputs loudly: a camera that went missing must fail here, not produce garbage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from fleet.common.policy.config import PolicyConfig
from fleet.common.policy.manifest import Manifest
from fleet.common.policy.model import UnifiedPolicy
from fleet.common.policy.weights import load_version
from protos.joint_layout import JOINT_DIM

log = logging.getLogger(__name__)


class PolicyRunner:
    """Runs one policy version on the cell computer."""

    def __init__(self, model: UnifiedPolicy, version_id: str) -> None:
        self.model = model.to("cpu").eval()
        self.version_id = version_id
        self.config: PolicyConfig = model.config
        self._lower = np.asarray(self.config.joint_lower, np.float32)
        self._upper = np.asarray(self.config.joint_upper, np.float32)

    @classmethod
    def from_version(cls, weights: bytes, manifest: Manifest) -> PolicyRunner:
        """Check the weights against the manifest's sha256 and build a runner."""
        return cls(load_version(weights, manifest), manifest.version_id)

    def _images(self, frames: Mapping[str, np.ndarray]) -> torch.Tensor:
        missing = [c for c in self.config.cameras if c not in frames]
        if missing:
            raise ValueError(
                f"policy {self.version_id}: no frame from camera(s) {missing}; it needs "
                f"{list(self.config.cameras)}, got {sorted(frames)}"
            )
        arrays = []
        for cam in self.config.cameras:
            a = np.asarray(frames[cam])
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(
                    f"policy {self.version_id}: camera {cam!r} frame must be (H, W, 3) uint8 "
                    f"RGB, got {a.shape} {a.dtype}"
                )
            arrays.append(a)
        if len({a.shape for a in arrays}) == 1:
            return torch.from_numpy(np.stack(arrays)[None])
        # Cameras with different resolutions: bring each to the model's input size first.
        size = (int(self.config.image_size[0]), int(self.config.image_size[1]))
        resized = []
        for a in arrays:
            x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            resized.append(x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8))
        return torch.stack(resized)[None]

    def predict(
        self, frames: Mapping[str, np.ndarray], joint_pos: np.ndarray, task: str
    ) -> np.ndarray:
        """frames: camera -> (H, W, 3) uint8 RGB; joint_pos: (14,) rad. Returns (K, 14) f32 rad.

        Targets are clipped to the config's joint limits (the driver enforces the cell's own,
        possibly narrower, limits and step size on top).
        """
        task_id = self.model.task_index(task)
        joints = np.asarray(joint_pos, dtype=np.float32)
        if joints.shape != (JOINT_DIM,):
            raise ValueError(f"joint_pos must be ({JOINT_DIM},), got {joints.shape}")
        if not np.all(np.isfinite(joints)):
            raise ValueError(f"joint_pos has non-finite values: {joints}")
        images = self._images(frames)
        with torch.inference_mode():
            out = self.model(
                images,
                torch.from_numpy(joints.copy())[None],
                torch.tensor([task_id], dtype=torch.int64),
            )
        chunk = out[0].numpy().astype(np.float32, copy=False)
        return np.clip(chunk, self._lower, self._upper)

"""The unified policy: camera frames, joint positions and a task name to a chunk of joint targets.

Plain torch, no Ray, so the edge runs the exact module the learner trains. Images of any
size are resized to the config's image size, a shared CNN turns every camera into a small
grid of tokens, and a transformer reads them together with a joint token, a task token and
K learned query tokens; the query outputs become K future joint targets.

Targets are predicted in joint-limit-normalised space ([-1, 1]) as an offset from the current
position, in units of the config's per-joint `action_scale`, with the output layer initialised
to zero: an untrained version holds still rather than driving every joint to the middle of its
range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fleet.common.policy.config import PolicyConfig
from protos.joint_layout import GRIPPER_INDICES, JOINT_DIM

_PIXEL_MEAN = 0.5
_PIXEL_STD = 0.25


def _group_norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: batch statistics differ between training and one-frame
    # inference on a cell, and are meaningless across the learners of a LearnerGroup.
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = _group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(x + self.norm2(self.conv2(y)))


class SpatialSoftmax(nn.Module):
    """Feature maps (N, C, h, w) to K keypoints (N, K, 2): the softmax-weighted mean (x, y)
    in [-1, 1] of K learned maps, precise to a fraction of a feature cell."""

    def __init__(self, channels: int, keypoints: int) -> None:
        super().__init__()
        self.maps = nn.Conv2d(channels, keypoints, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, features: Tensor) -> Tensor:
        h, w = features.shape[-2:]
        logits = self.maps(features).flatten(2) / self.log_temperature.exp()
        weights = logits.softmax(-1)  # (N, K, h*w)
        ys = torch.linspace(-1.0, 1.0, h, device=features.device, dtype=weights.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device, dtype=weights.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(h * w, 2)
        return weights @ grid


def resize_images(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C, H, W) float images to `size`, as the model sees every frame: the one resize both
    the forward pass (a cell's full-size frames) and the learner's sampler (a batch from cells
    with other camera modes) use, so training sees what inference sees."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def random_shift(x: Tensor, pad: int) -> Tensor:
    """Each image of (N, C, H, W) moved by its own random whole-pixel offset in [-pad, pad],
    edges replicated (DrQ's augmentation). One slice per image: a gather over every pixel
    cost 10x as much on a CPU, a tenth of a small model's update."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2)).tolist()
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
    )


class ImageEncoder(nn.Module):
    """Shared CNN: one normalised image batch (N, 3, H, W) to (N, tokens, d_model): the
    average-pooled feature grid, then (if `keypoints`) one token per spatial-softmax
    keypoint."""

    def __init__(
        self,
        channels: tuple[int, ...],
        blocks_per_stage: int,
        d_model: int,
        token_grid: tuple[int, ...],
        keypoints: int = 0,
        keypoint_stage: int = -1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for c in channels:
            layers += [
                nn.Conv2d(previous, c, 3, stride=2, padding=1, bias=False),
                _group_norm(c),
                nn.GELU(),
            ]
            layers += [_ResidualBlock(c) for _ in range(blocks_per_stage)]
            previous = c
        self.stages = nn.Sequential(*layers)
        self.token_grid = (int(token_grid[0]), int(token_grid[1]))
        self.project = nn.Conv2d(previous, d_model, 1)
        # The keypoints read the output of stage `keypoint_stage` (-1: the last): an earlier,
        # finer map locates a small object to a few pixels where the last one is 8x coarser.
        stage = keypoint_stage % len(channels)
        self._keypoint_layer = (stage + 1) * (3 + blocks_per_stage)  # layers up to its end
        self.keypoints = SpatialSoftmax(channels[stage], keypoints) if keypoints else None
        if keypoints:
            self.keypoint_proj = nn.Linear(2, d_model)
            self.keypoint_embed = nn.Parameter(torch.randn(1, keypoints, d_model) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        early = None
        features = x
        for i, layer in enumerate(self.stages, start=1):
            features = layer(features)
            if i == self._keypoint_layer:
                early = features
        grid = features
        if tuple(grid.shape[-2:]) != self.token_grid:
            grid = F.adaptive_avg_pool2d(grid, self.token_grid)
        tokens = self.project(grid).flatten(2).transpose(1, 2)
        if self.keypoints is None:
            return tokens
        points = self.keypoint_proj(self.keypoints(early)) + self.keypoint_embed
        return torch.cat([tokens, points], dim=1)


class UnifiedPolicy(nn.Module):
    """One model for every cell and task (see the module docstring for the layout)."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        n_tokens = config.token_grid[0] * config.token_grid[1] + config.keypoints
        self.image_encoder = ImageEncoder(
            config.image_channels,
            config.image_blocks,
            d,
            config.token_grid,
            config.keypoints,
            config.keypoint_stage,
        )
        self.camera_embed = nn.Parameter(torch.randn(len(config.cameras), 1, d) * 0.02)
        self.spatial_embed = nn.Parameter(torch.randn(1, n_tokens, d) * 0.02)
        self.joint_proj = nn.Linear(JOINT_DIM, d)
        self.task_embed = nn.Embedding(len(config.tasks), d)
        nn.init.normal_(self.task_embed.weight, std=0.02)
        self.queries = nn.Parameter(torch.randn(config.chunk_len, d) * 0.02)
        self.query_pos = nn.Parameter(torch.randn(config.chunk_len, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d,
            config.n_heads,
            config.ff_dim,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, config.n_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False
        )
        self.head = nn.Linear(d, JOINT_DIM)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        # Limits come from the config (and so the manifest), not the weights file.
        lower = torch.tensor(config.joint_lower, dtype=torch.float32)
        upper = torch.tensor(config.joint_upper, dtype=torch.float32)
        self.register_buffer("joint_lower", lower, persistent=False)
        self.register_buffer("joint_upper", upper, persistent=False)
        scale = torch.tensor(config.action_scale or (1.0,) * JOINT_DIM, dtype=torch.float32)
        self.register_buffer("action_scale", scale, persistent=False)
        self._task_ids = {t: i for i, t in enumerate(config.tasks)}

    # -- joint normalisation -------------------------------------------------------------

    def normalize_joints(self, joints: Tensor) -> Tensor:
        """Radians (..., 14) to [-1, 1] by the joint limits."""
        lower = self.joint_lower.to(joints.dtype)
        upper = self.joint_upper.to(joints.dtype)
        return 2.0 * (joints - lower) / (upper - lower) - 1.0

    def denormalize_joints(self, normalized: Tensor) -> Tensor:
        """[-1, 1] (..., 14) back to radians."""
        lower = self.joint_lower.to(normalized.dtype)
        upper = self.joint_upper.to(normalized.dtype)
        return lower + (normalized + 1.0) * 0.5 * (upper - lower)

    # -- forward ----------------------------------------------------------------------------

    def task_index(self, task: str) -> int:
        """The task's id for the task embedding; ValueError for a task this policy never saw."""
        try:
            return self._task_ids[task]
        except KeyError:
            raise ValueError(
                f"unknown task {task!r}; this policy knows {list(self.config.tasks)}"
            ) from None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_inputs(self, images: Tensor, joint_pos: Tensor, task_id: Tensor) -> None:
        n_cams = len(self.config.cameras)
        if images.dim() != 5 or images.shape[1] != n_cams or images.shape[-1] != 3:
            raise ValueError(
                f"images must be (B, {n_cams}, H, W, 3) for cameras {list(self.config.cameras)},"
                f" got {tuple(images.shape)}"
            )
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 RGB, got {images.dtype}")
        b = images.shape[0]
        if tuple(joint_pos.shape) != (b, JOINT_DIM):
            raise ValueError(f"joint_pos must be ({b}, {JOINT_DIM}), got {tuple(joint_pos.shape)}")
        if tuple(task_id.shape) != (b,):
            raise ValueError(f"task_id must be ({b},), got {tuple(task_id.shape)}")

    def _image_tokens(self, images: Tensor) -> Tensor:
        b, n_cams, h, w, _ = images.shape
        x = images.reshape(b * n_cams, h, w, 3).permute(0, 3, 1, 2).float().div_(255.0)
        x = resize_images(x, (int(self.config.image_size[0]), int(self.config.image_size[1])))
        if self.training and self.config.shift_augment:
            x = random_shift(x, int(self.config.shift_augment))
        x = (x - _PIXEL_MEAN) / _PIXEL_STD
        tokens = self.image_encoder(x) + self.spatial_embed  # (b * n_cams, n_tokens, d)
        tokens = tokens.reshape(b, n_cams, -1, tokens.shape[-1]) + self.camera_embed
        return tokens.reshape(b, -1, tokens.shape[-1])

    def forward_normalized(self, images: Tensor, joint_pos: Tensor, task_id: Tensor) -> Tensor:
        """Like forward, but the chunk stays in normalised joint space (what the loss sees)."""
        self._check_inputs(images, joint_pos, task_id)
        b = images.shape[0]
        joint_norm = self.normalize_joints(joint_pos.float())
        tokens = torch.cat(
            [
                self.task_embed(task_id.long()).unsqueeze(1),
                self.joint_proj(joint_norm).unsqueeze(1),
                self._image_tokens(images),
                (self.queries + self.query_pos).unsqueeze(0).expand(b, -1, -1),
            ],
            dim=1,
        )
        out = self.encoder(tokens)[:, -self.config.chunk_len :]
        return joint_norm.unsqueeze(1) + self.head(out) * self.action_scale

    def forward(self, images: Tensor, joint_pos: Tensor, task_id: Tensor) -> Tensor:
        """uint8 (B, n_cams, H, W, 3), f32 (B, 14) rad, i64 (B,) to f32 (B, K, 14) rad."""
        return self.denormalize_joints(self.forward_normalized(images, joint_pos, task_id))

    # -- training ---------------------------------------------------------------------------

    def bc_loss(
        self, batch: Mapping[str, Tensor], predicted: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Weighted, masked behaviour cloning on action chunks in normalised joint space: L1,
        or on arm joints Huber below the config's `huber_beta` (see PolicyConfig).

        `predicted` lets a caller that already ran forward_normalized (RLlib's forward_train)
        avoid a second forward pass. Padding past an episode's end (action_mask 0) is ignored;
        `weight` scales each sample (the sampler weights interventions up).
        """
        actions = batch["actions"].float()
        if predicted is None:
            predicted = self.forward_normalized(
                batch["images"], batch["joint_pos"], batch["task_id"]
            )
        if predicted.shape != actions.shape:
            raise ValueError(
                f"actions must be {tuple(predicted.shape)} (B, K, {JOINT_DIM}),"
                f" got {tuple(actions.shape)}"
            )
        b, k = actions.shape[:2]
        mask = batch.get("action_mask")
        mask = torch.ones(b, k, device=actions.device) if mask is None else mask.float()
        weight = batch.get("weight")
        weight = torch.ones(b, device=actions.device) if weight is None else weight.float()

        # In action_scale units: each joint's error relative to how far that joint moves.
        abs_err = (predicted - self.normalize_joints(actions)).abs()  # joint-limit units
        scaled = abs_err / self.action_scale
        beta = float(self.config.huber_beta)
        if beta > 0.0:
            huber = torch.where(scaled < beta, 0.5 * scaled.square() / beta, scaled - 0.5 * beta)
            arm = torch.ones(JOINT_DIM, dtype=torch.bool, device=scaled.device)
            arm[list(GRIPPER_INDICES)] = False  # open or closed: L1 keeps the median
            scaled = torch.where(arm, huber, scaled)
        step_err = scaled.mean(-1)  # (B, K)
        valid = mask.sum(1)
        per_sample = (step_err * mask).sum(1) / valid.clamp_min(1.0)
        weight = weight * (valid > 0).float()
        loss = (weight * per_sample).sum() / weight.sum().clamp_min(1e-8)

        with torch.no_grad():
            rad_err = (self.denormalize_joints(predicted) - actions).abs().mean(-1)
            mask_total = mask.sum().clamp_min(1.0)
            metrics = {
                "loss": float(loss.detach()),
                "l1_normalized": float((abs_err.mean(-1) * mask).sum() / mask_total),
                "abs_err_rad": float((rad_err * mask).sum() / mask_total),
                "first_step_abs_err_rad": float(
                    (rad_err[:, 0] * mask[:, 0]).sum() / mask[:, 0].sum().clamp_min(1.0)
                ),
            }
        return loss, metrics

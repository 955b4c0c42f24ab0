"""The unified policy's architecture as plain data.

A config travels inside every version manifest, so an edge actor can rebuild exactly the
network the learner trained. Presets pick the size; a deployment chooses one by name (and may
override single fields) instead of editing code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protos.joint_layout import JOINT_DIM, JOINT_LOWER, JOINT_UPPER

# Fields a preset fills. "tiny" trains on a laptop CPU in seconds (tests, the light
# kinematic fleet); "small" is what two CPU cores train for the MuJoCo cells within an hour
# (fleet up's default there; README "How well it learns"); "base" is an ACT-sized model for
# one GPU; "large" is the ~100M+ parameter fleet model.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "chunk_len": 10,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "ff_dim": 256,
        "dropout": 0.0,
        "image_size": (48, 64),
        "image_channels": (16, 32, 64),
        "image_blocks": 1,
        "token_grid": (3, 4),
        "keypoints": 0,
        "shift_augment": 0,
        "huber_beta": 0.0,
    },
    "base": {
        "chunk_len": 10,
        "d_model": 512,
        "n_layers": 6,
        "n_heads": 8,
        "ff_dim": 2048,
        "dropout": 0.1,
        "image_size": (192, 256),
        "image_channels": (64, 128, 256, 512),
        "image_blocks": 2,
        "token_grid": (6, 8),
        "keypoints": 0,
        "shift_augment": 0,
        "huber_beta": 0.0,
    },
    "large": {
        "chunk_len": 10,
        "d_model": 1024,
        "n_layers": 8,
        "n_heads": 16,
        "ff_dim": 4096,
        "dropout": 0.1,
        "image_size": (240, 320),
        "image_channels": (64, 128, 256, 512),
        "image_blocks": 2,
        "token_grid": (8, 10),
        "keypoints": 0,
        "shift_augment": 0,
        "huber_beta": 0.0,
    },
}

# tiny's transformer; an input twice as fine with a fourth encoder stage, where a 6-pixel
# cube is still a feature; keypoints that say where; random shift; and chunks of 30 steps,
# whose far targets only the frames can predict (measured: the first decision's correlation
# with the demonstrations' rose from 0.39 to 0.86); and Huber on arm joints, so the joints
# only one task moves are trained at all (README "How well it learns").
PRESETS["small"] = {
    **PRESETS["tiny"],
    "chunk_len": 30,
    "image_size": (96, 128),
    "image_channels": (8, 16, 32, 64),
    "keypoints": 16,
    "shift_augment": 4,
    "huber_beta": 1.0,
}

# The default each preset-filled field starts at; it means "take the preset's value".
_FROM_PRESET: dict[str, Any] = {
    "chunk_len": 0,
    "d_model": 0,
    "n_layers": 0,
    "n_heads": 0,
    "ff_dim": 0,
    "dropout": -1.0,
    "image_size": (),
    "image_channels": (),
    "image_blocks": -1,
    "token_grid": (),
    "keypoints": -1,
    "shift_augment": -1,
    "huber_beta": -1.0,
}

# Fields added after versions were first published, with the value that rebuilds those
# versions' network exactly: a manifest without the field gets this, not the preset's.
_LEGACY: dict[str, Any] = {
    "keypoints": 0,
    "shift_augment": 0,
    "action_scale": (),
    "keypoint_stage": -1,
    "huber_beta": 0.0,
}

_TUPLE_FIELDS = (
    "tasks",
    "cameras",
    "image_size",
    "image_channels",
    "token_grid",
    "joint_lower",
    "joint_upper",
    "action_scale",
)


@dataclass(frozen=True)
class PolicyConfig:
    """Everything needed to rebuild a UnifiedPolicy.

    Architecture fields left at their zero/empty/negative default are filled from `preset`
    (so `PolicyConfig(tasks=..., cameras=..., preset="base")` is a base model); any value
    given explicitly wins over the preset.
    """

    tasks: tuple[str, ...]
    cameras: tuple[str, ...]
    preset: str = "tiny"
    chunk_len: int = 0
    d_model: int = 0
    n_layers: int = 0
    n_heads: int = 0
    ff_dim: int = 0
    dropout: float = -1.0
    image_size: tuple[int, ...] = ()
    image_channels: tuple[int, ...] = ()
    image_blocks: int = -1
    token_grid: tuple[int, ...] = ()
    # Spatial-softmax keypoints per camera, each one more token (0 = none): where a feature
    # is, to a fraction of a cell, which average-pooled grid tokens blur away.
    keypoints: int = -1
    # Which encoder stage the keypoints read (0 = the first, finest; -1 = the last).
    keypoint_stage: int = -1
    # Random-shift augmentation while training: every image moves by up to this many pixels
    # (of image_size), edges replicated (DrQ); never at inference.
    shift_augment: int = -1
    joint_lower: tuple[float, ...] = tuple(float(x) for x in JOINT_LOWER)
    joint_upper: tuple[float, ...] = tuple(float(x) for x in JOINT_UPPER)
    # Per joint, the typical size of a chunk's offset from the current position in
    # joint-limit-normalised units, measured on the data (learner.sampler.action_scale): the
    # head predicts offsets in these units and the loss weighs each joint by them, so an arm
    # joint that moves 0.01 of its range is fitted as precisely as a gripper that moves 0.5
    # of its range. () = 1.0 for every joint (versions published before the field existed).
    action_scale: tuple[float, ...] = ()
    # The loss on arm joints: Huber (smooth L1) turning quadratic below this error, in
    # action_scale units; 0 = plain L1. Grippers are always L1. With plain L1 a joint that
    # holds still in most samples (the right waist: push_to_target never moves it) is
    # pinned at "no motion": the samples that hold still pull its output to exactly zero
    # as hard as the ones that move pull it away, and its head row never grows.
    huber_beta: float = -1.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown policy preset {self.preset!r}; known: {sorted(PRESETS)}")
        for name in ("tasks", "cameras"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a sequence of names, not one string")
        for name in _TUPLE_FIELDS:
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) == _FROM_PRESET[name]:
                object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        if not self.tasks or any(not isinstance(t, str) or not t for t in self.tasks):
            raise ValueError(f"tasks must be non-empty strings, got {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"duplicate task names in {self.tasks!r}")
        if not self.cameras or any(not isinstance(c, str) or not c for c in self.cameras):
            raise ValueError(f"cameras must be non-empty strings, got {self.cameras!r}")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"duplicate camera names in {self.cameras!r}")
        for name in ("chunk_len", "d_model", "n_layers", "n_heads", "ff_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("image_blocks", "keypoints", "shift_augment"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.huber_beta) and self.huber_beta >= 0.0):
            raise ValueError(f"huber_beta must be a finite number >= 0, got {self.huber_beta}")
        for name in ("image_size", "token_grid"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"{name} must be two positive ints (height, width), got {value}")
        if not self.image_channels or min(self.image_channels) < 1:
            raise ValueError(f"image_channels must be positive ints, got {self.image_channels}")
        if not -len(self.image_channels) <= self.keypoint_stage < len(self.image_channels):
            raise ValueError(
                f"keypoint_stage must name one of the {len(self.image_channels)} encoder stages"
                f" (0..{len(self.image_channels) - 1} or negative from the end),"
                f" got {self.keypoint_stage}"
            )
        if self.action_scale and (
            len(self.action_scale) != JOINT_DIM
            or not all(math.isfinite(x) and x > 0 for x in self.action_scale)
        ):
            raise ValueError(
                f"action_scale must be empty or {JOINT_DIM} positive numbers,"
                f" got {self.action_scale!r}"
            )
        if len(self.joint_lower) != JOINT_DIM or len(self.joint_upper) != JOINT_DIM:
            raise ValueError(f"joint limits must have {JOINT_DIM} values each")
        if any(
            not (math.isfinite(lo) and math.isfinite(hi) and hi > lo)
            for lo, hi in zip(self.joint_lower, self.joint_upper, strict=True)
        ):
            raise ValueError("every joint needs finite limits with upper > lower")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists)."""
        return {
            f.name: list(getattr(self, f.name))
            if isinstance(getattr(self, f.name), tuple)
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicyConfig:
        """Inverse of to_dict. Unknown keys are an error: they mean a different architecture."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown policy config keys {unknown}; known: {sorted(known)}")
        missing = [k for k in ("tasks", "cameras") if k not in d]
        if missing:
            raise ValueError(f"policy config lacks {missing}")
        kwargs = {k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in d.items()}
        return cls(**{**_LEGACY, **kwargs})


def policy_config(
    preset: str, tasks: Sequence[str], cameras: Sequence[str], **overrides: Any
) -> PolicyConfig:
    """A config from a named preset, with single fields overridden (e.g. chunk_len=20)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown policy preset {preset!r}; known: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(PolicyConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown policy config overrides {unknown}")
    values: dict[str, Any] = {**PRESETS[preset], **overrides}
    return PolicyConfig(tasks=tuple(tasks), cameras=tuple(cameras), preset=preset, **values)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """Command-line KEY=VALUE pairs (VALUE as JSON, else a string) for PolicyConfig fields,
    e.g. ["keypoints=16", "image_size=[96,128]"]; unknown fields are a ValueError."""
    fields = {f.name for f in dataclasses.fields(PolicyConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"policy setting {pair!r}: want KEY=VALUE with KEY one of {sorted(fields)}"
            )
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out

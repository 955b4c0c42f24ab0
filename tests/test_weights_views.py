"""The cells' zero-copy safetensors reader must read exactly what the safetensors library
reads, and refuse every file the library refuses: it is what stands between downloaded bytes
and the model that drives the arms."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.torch
import torch

from fleet.common.policy.config import policy_config
from fleet.common.policy.model import UnifiedPolicy
from fleet.common.policy.weights import (
    load_state_bytes,
    model_from_bytes,
    state_dict_to_bytes,
    tensor_views,
)

TASKS = ("pick_cube", "touch_target")
CAMERAS = ("overhead",)


def _mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(3, 5, generator=g),
        "w16": torch.randn(7, generator=g).half(),
        "bf": torch.randn(2, 2, generator=g).bfloat16(),
        "steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }


def test_views_equal_what_the_library_reads() -> None:
    data = bytearray(safetensors.torch.save(_mixed_state()))
    ours = tensor_views(data)
    theirs = safetensors.torch.load(bytes(data))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape
        assert torch.equal(ours[name], tensor), name


def _file(header: dict, payload: bytes) -> bytearray:
    raw = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(raw)) + raw + payload)


HOSTILE = {
    "shorter than a header": bytearray(b"\x01\x02"),
    "header longer than the file": bytearray(struct.pack("<Q", 1 << 20) + b"{}"),
    "header not JSON": bytearray(struct.pack("<Q", 4) + b"{{{{"),
    "header not an object": _file([1, 2], b""),  # type: ignore[arg-type]
    "unknown dtype": _file(
        {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "range shorter than shape": _file(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "overlapping tensors": _file(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "gap between tensors": _file(
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        },
        b"\0" * 12,
    ),
    "trailing bytes": _file(
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9
    ),
    "range past the end": _file(
        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
    ),
    "negative dimension": _file(
        {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b""
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_refuses_what_the_library_refuses(case: str) -> None:
    data = HOSTILE[case]
    with pytest.raises(Exception):  # noqa: B017 - the library's own error types vary
        safetensors.torch.load(bytes(data))
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        tensor_views(data)


def test_model_from_bytes_computes_like_the_copying_load() -> None:
    torch.manual_seed(3)
    config = policy_config("tiny", TASKS, CAMERAS)
    data = state_dict_to_bytes(UnifiedPolicy(config))
    copied = UnifiedPolicy(config)
    load_state_bytes(copied, data)
    shared = model_from_bytes(config, bytearray(data))
    assert not shared.training
    rng = np.random.default_rng(0)
    h, w = config.image_size
    images = torch.from_numpy(rng.integers(0, 255, (2, 1, h, w, 3), dtype=np.uint8))
    joints = torch.from_numpy(rng.random((2, 14), dtype=np.float32))
    task = torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(copied.eval()(images, joints, task), shared(images, joints, task))


def test_weights_of_another_architecture_are_refused() -> None:
    small = state_dict_to_bytes(UnifiedPolicy(policy_config("tiny", TASKS, CAMERAS)))
    wider = policy_config("tiny", TASKS, CAMERAS, d_model=128)
    with pytest.raises(ValueError, match="do not match the model architecture"):
        model_from_bytes(wider, bytearray(small))

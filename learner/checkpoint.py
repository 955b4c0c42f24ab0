"""Trainer checkpoints without pickle: tensors in safetensors, everything else in JSON.

RLlib's LearnerGroup.get_state() is a nested dict of numpy arrays / tensors (weights, Adam's
exp_avg, step) and plain scalars (param_groups, ids). We flatten it: every array leaf goes to
`tensors.safetensors` under its path, the rest of the tree goes to `state.json` with a
placeholder naming the tensor. Dict keys keep their type (optimizer state is keyed by int),
so set_state() gets back exactly what get_state() gave. A checkpoint is written to a temp dir,
fsynced and renamed into place, so a crash mid-write leaves the previous checkpoint intact,
and once save_checkpoint returns the new one survives a power cut too (the trainer publishes
a version only after the checkpoint that names it is saved: learner/trainer.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from learner.group_commit import fsync_path

log = logging.getLogger(__name__)

LATEST = "latest"
_TENSORS = "tensors.safetensors"
_STATE = "state.json"


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path, "kind": "torch"}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.array(value, copy=True))
        return {"__tensor__": path, "kind": "numpy"}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        items = []
        for i, (k, v) in enumerate(value.items()):
            if not isinstance(k, str | int | float | bool) and k is not None:
                raise TypeError(f"checkpoint key {k!r} at {path} is not a scalar")
            items.append([k, _encode(v, f"{path}/{i}", tensors)])
        return {"__dict__": items}
    if isinstance(value, list | tuple):
        out = [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": out} if isinstance(value, tuple) else out
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"checkpoint value at {path} is a {type(value).__name__}; not storable")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            t = tensors[value["__tensor__"]]
            return t.numpy() if value["kind"] == "numpy" else t
        if "__dict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
    return value


def save_checkpoint(root: Path, state: dict[str, Any]) -> Path:
    """Atomically replace `root/latest` with `state`; returns the checkpoint directory."""
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    tmp = root / f".tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    save_file(tensors, str(tmp / _TENSORS))
    (tmp / _STATE).write_text(json.dumps(tree))
    for path in (tmp / _TENSORS, tmp / _STATE, tmp):
        fsync_path(path)
    final = root / LATEST
    old = root / f".old-{time.time_ns()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_path(root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path) -> dict[str, Any] | None:
    """The state last saved under `root`, or None when there is none yet."""
    final = root / LATEST
    if not (final / _STATE).exists():
        # A crash between the two renames leaves the previous checkpoint as .old-*.
        olds = sorted(p for p in root.glob(".old-*") if (p / _STATE).exists())
        if not olds:
            return None
        final = olds[-1]
    tensors = load_file(str(final / _TENSORS))
    return _decode(json.loads((final / _STATE).read_text()), tensors)

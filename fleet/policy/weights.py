"""Policy weights as safetensors bytes, and versions as (weights, manifest) file pairs.

Safetensors, never pickles: a weights file from the network must not be able to run code.
The SHA-256 of the exact bytes goes into the manifest, and loading checks it first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from fleet.policy.config import PolicyConfig
from fleet.policy.manifest import Manifest
from fleet.policy.model import UnifiedPolicy

log = logging.getLogger(__name__)

_VERSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def state_dict_to_bytes(model: nn.Module) -> bytes:
    """The model's state as safetensors bytes (contiguous CPU copies, deterministic order)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return safetensors_save(state, metadata={"format": "pt"})


def load_state_bytes(model: nn.Module, data: bytes) -> None:
    """Load safetensors bytes into `model`; every key and shape must match exactly."""
    try:
        state = safetensors_load(data)
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"weights are not a valid safetensors file: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or wrong_shape:
        raise ValueError(
            "weights do not match the model architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {wrong_shape[:5]}{'...' if len(wrong_shape) > 5 else ''}"
        )
    model.load_state_dict(state, strict=True)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    # tmp file in the same directory + fsync + os.replace: readers see the old file or the
    # whole new one, never a torn write, even if the learner dies mid-publish.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_version(
    directory: Path,
    model: nn.Module,
    manifest: Manifest,
    *,
    signer: Callable[[str, str], str] | None = None,
) -> tuple[Path, Path]:
    """Write <version_id>.safetensors then <version_id>.json, both atomically.

    Fills manifest.sha256 and manifest.parameter_count from what is written. The manifest
    lands last, so a manifest on disk always has its complete weights beside it.
    """
    if not _VERSION_ID.match(manifest.version_id):
        raise ValueError(
            f"version id {manifest.version_id!r} is not a safe file name "
            "(letters, digits, '.', '_', '-'; not starting with a dot)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = state_dict_to_bytes(model)
    manifest.sha256 = sha256_hex(data)
    manifest.parameter_count = sum(p.numel() for p in model.parameters())
    if signer is not None:  # signature over (version_id, sha256), before the manifest lands
        manifest.signature = signer(manifest.version_id, manifest.sha256)
    weights_path = directory / f"{manifest.version_id}.safetensors"
    manifest_path = directory / f"{manifest.version_id}.json"
    _atomic_write(weights_path, data)
    _atomic_write(manifest_path, manifest.to_json().encode())
    log.info(
        "saved version %s: %d bytes, %d parameters, sha256 %s",
        manifest.version_id,
        len(data),
        manifest.parameter_count,
        manifest.sha256[:12],
    )
    return weights_path, manifest_path


def load_version(weights: bytes, manifest: Manifest) -> UnifiedPolicy:
    """Rebuild the version's model from its manifest and load its checked weights (eval mode).

    Checks the SHA-256 only; signature verification is the caller's (it owns the keys).
    """
    digest = sha256_hex(weights)
    if digest != manifest.sha256:
        raise ValueError(
            f"version {manifest.version_id}: weights sha256 {digest[:16]}... does not match "
            f"the manifest's {manifest.sha256[:16]}..."
        )
    config = PolicyConfig.from_dict(manifest.model_config)
    with torch.device("cpu"):
        model = UnifiedPolicy(config)
    load_state_bytes(model, weights)
    model.eval()
    return model

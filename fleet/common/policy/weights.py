"""Policy weights as safetensors bytes, and versions as (weights, manifest) file pairs.

Safetensors, never pickles: a weights file from the network must not be able to run code.
The SHA-256 of the exact bytes goes into the manifest, and loading checks it first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from fleet.common.ids import ID_RULE, is_safe_id
from fleet.common.policy.config import PolicyConfig
from fleet.common.policy.manifest import Manifest
from fleet.common.policy.model import UnifiedPolicy

log = logging.getLogger(__name__)


def state_dict_to_bytes(model: nn.Module) -> bytes:
    """The model's state as safetensors bytes (contiguous CPU copies, deterministic order)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return safetensors_save(state, metadata={"format": "pt"})


# safetensors dtype names -> torch dtypes (the ones a policy's state can hold).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 << 20  # as the safetensors library's own bound


def tensor_views(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views into `data` (no copy of the payload).

    The same strict checks as the safetensors library (header length and JSON, known dtypes,
    each tensor's byte range matching its shape, ranges that tile the payload exactly, no
    trailing bytes) but without its copy of every tensor. Why it is kept (#15, measured on
    the 2-core dev machine under load, a base-preset version of 33.3M parameters, 133 MB,
    one swap in a fresh process after a warm-up swap, median of 5): `model_from_bytes` took
    0.166 s of CPU; the library's `safetensors.torch.load` in its place 0.203 s from a
    `bytes` and 0.284 s from the watcher's receive `bytearray`, which it only takes as a
    copy (1.2-1.7x), and the library holds a second 133 MB copy at the swap's peak. The
    parser's price is this function, checked against the library on good and hostile files
    by tests/test_weights_views.py. The views share `data`'s memory: pass a
    buffer nobody writes to afterwards (a read-only `bytes` gives read-only-backed tensors;
    copy them before training on them)."""
    view = memoryview(data).cast("B")
    size = len(view)
    if size < 8:
        raise ValueError("weights are not a valid safetensors file: shorter than its header")
    header_len = int.from_bytes(view[:8], "little")
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
        raise ValueError(f"weights are not a valid safetensors file: header length {header_len}")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"weights are not a valid safetensors file: header: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("weights are not a valid safetensors file: header is not an object")
    header.pop("__metadata__", None)
    base = 8 + header_len
    spans: list[tuple[int, int, str]] = []
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"weights are not a valid safetensors file: tensor {name!r}: {exc!r}"
            ) from None
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (
            min(shape, default=0) < 0
            or not 0 <= begin <= end <= size - base
            or end - begin != numel * itemsize
        ):
            raise ValueError(
                f"weights are not a valid safetensors file: tensor {name!r} of shape {shape} "
                f"{info['dtype']} has byte range {begin}..{end}"
            )
        spans.append((begin, end, name))
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (base + begin) % itemsize:  # unaligned: this one tensor is copied
            out[name] = torch.frombuffer(
                bytearray(view[base + begin : base + end]), dtype=dtype
            ).reshape(shape)
        else:
            out[name] = torch.frombuffer(
                view, dtype=dtype, count=numel, offset=base + begin
            ).reshape(shape)
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise ValueError(
                f"weights are not a valid safetensors file: tensor {name!r} starts at "
                f"{begin}, expected {covered} (overlap or gap)"
            )
        covered = end
    if base + covered != size:
        raise ValueError(
            f"weights are not a valid safetensors file: {size - base - covered} bytes "
            "after the last tensor"
        )
    return out


def _views(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    # torch warns on views of a read-only buffer; callers copy (load_state_bytes) or own the
    # buffer (model_from_bytes), so the warning says nothing here. (catch_warnings is not
    # thread-safe: only where it is needed, never on a cell's writable receive buffer.)
    if not memoryview(data).readonly:
        return tensor_views(data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return tensor_views(data)


def _check_matches(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    wrong_dtype = sorted(
        f"{k}: file {state[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if k in state and state[k].shape == v.shape and state[k].dtype != v.dtype
    )
    if missing or unexpected or wrong_shape or wrong_dtype:
        raise ValueError(
            "weights do not match the model architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {wrong_shape[:5]}{'...' if len(wrong_shape) > 5 else ''}"
            + (f", wrong dtype {wrong_dtype[:5]}" if wrong_dtype else "")
        )


def load_state_bytes(model: nn.Module, data: bytes | bytearray | memoryview) -> None:
    """Copy safetensors bytes into `model`'s own tensors; every key and shape must match."""
    state = _views(data)
    _check_matches(model, state)
    model.load_state_dict(state, strict=True)


def model_from_bytes(config: PolicyConfig, data: bytearray | memoryview) -> UnifiedPolicy:
    """A model of `config` whose weights ARE `data` (eval mode): the checked buffer's tensors
    become its parameters through `load_state_dict(assign=True)`, zero-copy. For the cells:
    the bytes whose SHA-256 was checked are the very bytes the model computes with, and a
    ~100 MB version costs no copy of its own and no second 100 MB of fresh pages. `data`
    must stay unwritten for the model's life (the watcher's receive buffer, handed over and
    never touched again).

    The model is built on the CPU and its random init thrown away (~0.06 s per 100 MB). On
    the meta device it would cost nothing per version, but the first meta build in a process
    imports torch's Python decompositions (~1 s of CPU, on the cell's first version)."""
    with torch.device("cpu"):
        model = UnifiedPolicy(config)
    state = _views(data)
    _check_matches(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all at once (versions, and manifests gaining results)."""
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
    if not is_safe_id(manifest.version_id):
        raise ValueError(f"version id {manifest.version_id!r} is not a safe file name ({ID_RULE})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = state_dict_to_bytes(model)
    manifest.sha256 = sha256_hex(data)
    manifest.parameter_count = sum(p.numel() for p in model.parameters())
    if signer is not None:  # signature over (version_id, sha256), before the manifest lands
        manifest.signature = signer(manifest.version_id, manifest.sha256)
    weights_path = directory / f"{manifest.version_id}.safetensors"
    manifest_path = directory / f"{manifest.version_id}.json"
    write_atomic(weights_path, data)
    write_atomic(manifest_path, manifest.to_json().encode())
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

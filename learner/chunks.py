"""Validation of an uploaded StepChunk into plain numpy before it touches the episode store.

Everything a cell (or a hostile peer) sends is checked here, once, so the store only ever
sees well-formed columns: safe ids (they become directory names), the dtypes and shapes the
proto promises, one step count across every column and camera, finite numbers, a known task,
and an outcome exactly on the closing chunk. A rejection names the cell, episode, seq and
field, so the person reading the ack (or the actor's log) knows what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from fleet.common.ids import ID_RULE, MAX_ID_LEN, is_safe_id
from fleet.common.wire import WireError, from_tensor
from learner.frame_checks import MAX_IMAGE_PIXELS, frame_problem
from protos.fleetlearn.v1 import arrays_pb2, trajectory_pb2
from protos.joint_layout import JOINT_DIM

ENCODINGS = frozenset({"jpeg", "png16", "zstd16", "raw"})
MAX_IMAGE_SIDE = 8192
MAX_CAMERAS = 16


@dataclass(frozen=True)
class CameraColumn:
    """One camera's encoded frames over a chunk, one frame per step."""

    camera: str
    encoding: str
    height: int
    width: int
    channels: int
    frames: list[bytes]


@dataclass(frozen=True)
class DecodedChunk:
    """A validated chunk of consecutive steps of one episode, as numpy columns."""

    cell_id: str
    episode_id: str
    seq: int
    first_step: int
    task: str
    policy_version: str
    timestamp: np.ndarray  # (T,) float64, cell clock seconds
    joint_pos: np.ndarray  # (T, 14) float32
    action: np.ndarray  # (T, 14) float32
    intervention: np.ndarray  # (T,) bool
    reward: np.ndarray  # (T,) float32
    cameras: dict[str, CameraColumn]
    last: bool
    # {"success": bool, "reason": str, "started_at": float, "ended_at": float} when last.
    outcome: dict[str, Any] | None
    # Shadow evaluation (learner/shadow_scoring.py): the shadow version's (T, 14) actions.
    shadow_action: np.ndarray | None = None
    shadow_version: str = ""

    @property
    def n_steps(self) -> int:
        return int(self.timestamp.shape[0])


class ChunkRejected(Exception):
    """A chunk the learner will not store; `code` is the gRPC status the ack carries."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


# reject(field, problem, code=INVALID_ARGUMENT) -> the exception to raise.
_Reject = Callable[..., "ChunkRejected"]


def _where(msg: trajectory_pb2.StepChunk) -> str:
    """'cell X episode Y seq N' for messages, with untrusted ids shortened and quoted."""

    def show(value: str) -> str:
        return value if is_safe_id(value) else repr(value[:40])

    return f"cell {show(msg.cell_id)} episode {show(msg.episode_id)} seq {msg.seq}"


# Steps one episode may hold (30 min at 20 Hz, 12 at 50 Hz). One cell whose episode never
# ends (an operator who left it in teleop, an actor whose time limit is off) must not fill
# the store with an episode that is never complete, so never trained on: past the limit its
# chunks are refused, and the sweeper marks what came before truncated (trainable).
MAX_EPISODE_STEPS = 36_000


def decode_chunk(
    msg: trajectory_pb2.StepChunk,
    *,
    known_tasks: Collection[str] | None,
    max_steps: int = 1000,
    max_bytes: int = 64 << 20,
    max_episode_steps: int = MAX_EPISODE_STEPS,
    full_decode: bool = False,
) -> DecodedChunk:
    """Check `msg` against the contract and return its columns; raises ChunkRejected.

    `known_tasks=None` accepts any non-empty task name. `full_decode` decodes every JPEG
    frame besides checking its header (learner/frame_checks.py says why it is off).
    `max_episode_steps` bounds an episode: steps past it are refused (see MAX_EPISODE_STEPS).
    """
    where = _where(msg)

    def reject(
        field: str, problem: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT
    ) -> ChunkRejected:
        return ChunkRejected(code, f"{where}: {field}: {problem}")

    # One copy of each camera's frames out of the message (indexing or iterating a repeated
    # bytes field copies every time), used for the size limit and kept as the columns.
    frame_lists = [list(cam.frames) for cam in msg.cameras]
    size = _payload_bytes(msg, frame_lists)
    if size > max_bytes:
        raise reject(
            "chunk",
            f"{size} bytes exceeds the limit of {max_bytes}; send fewer steps per chunk",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    for field in ("cell_id", "episode_id"):
        value = getattr(msg, field)
        if not is_safe_id(value):
            raise reject(
                field,
                f"{value[:40]!r} is not a valid id ({ID_RULE})",
            )
    if not msg.task:
        raise reject("task", "empty; every chunk names its task")
    if len(msg.task) > MAX_ID_LEN:
        raise reject("task", f"longer than {MAX_ID_LEN} characters")
    if known_tasks is not None and msg.task not in known_tasks:
        raise reject(
            "task", f"unknown task {msg.task[:80]!r}; the learner knows {sorted(known_tasks)}"
        )
    if msg.seq == 0 and msg.first_step != 0:
        # Checked here, before the store creates the episode: a refused first chunk must
        # leave nothing on disk (a stray empty episode would later count as truncated).
        raise reject("first_step", f"{msg.first_step} on seq 0; an episode starts at step 0")
    if len(msg.policy_version) > MAX_ID_LEN:
        raise reject("policy_version", f"longer than {MAX_ID_LEN} characters")

    timestamp = _column(msg, "timestamp", "float64", (None,), reject)
    n = int(timestamp.shape[0])
    if n == 0:
        raise reject("timestamp", "no steps; a chunk carries at least one step")
    if n > max_steps:
        raise reject(
            "timestamp",
            f"{n} steps exceeds the limit of {max_steps} per chunk; send smaller chunks",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    if msg.first_step + n > max_episode_steps:
        raise reject(
            "first_step",
            f"steps {msg.first_step}..{msg.first_step + n - 1} go past the learner's limit of "
            f"{max_episode_steps} steps an episode (fleet learner --max-episode-steps); end "
            "episodes sooner (the cell's max_episode_s). The steps before the limit are kept",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    joint_pos = _column(msg, "joint_pos", "float32", (n, JOINT_DIM), reject)
    action = _column(msg, "action", "float32", (n, JOINT_DIM), reject)
    intervention = _column(msg, "intervention", "bool", (n,), reject)
    reward = _column(msg, "reward", "float32", (n,), reject)
    for name, arr in (
        ("timestamp", timestamp),
        ("joint_pos", joint_pos),
        ("action", action),
        ("reward", reward),
    ):
        if not np.isfinite(arr).all():
            bad = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise reject(name, f"non-finite value (NaN or inf) at step {msg.first_step + bad}")
    # A bool travels as one byte; anything but 0/1 means the sender packed it wrongly.
    if (np.frombuffer(msg.intervention.data, dtype=np.uint8) > 1).any():
        raise reject("intervention", "bool bytes must be 0 or 1")

    cameras = _cameras(msg, frame_lists, n, reject, full_decode=full_decode)
    outcome = _outcome(msg, reject)
    shadow_action = None
    if msg.HasField("shadow_action"):
        shadow_action = _column(msg, "shadow_action", "float32", (n, JOINT_DIM), reject)
        if not np.isfinite(shadow_action).all() or len(msg.shadow_version) > MAX_ID_LEN:
            raise reject("shadow_action", "non-finite value or over-long shadow_version")
    return DecodedChunk(
        cell_id=msg.cell_id,
        episode_id=msg.episode_id,
        seq=int(msg.seq),
        first_step=int(msg.first_step),
        task=msg.task,
        policy_version=msg.policy_version,
        timestamp=timestamp,
        joint_pos=joint_pos,
        action=action,
        intervention=intervention.astype(bool, copy=False),
        reward=reward,
        cameras=cameras,
        last=bool(msg.last),
        outcome=outcome,
        shadow_action=shadow_action,
        shadow_version=msg.shadow_version if shadow_action is not None else "",
    )


def _payload_bytes(msg: trajectory_pb2.StepChunk, frame_lists: list[list[bytes]]) -> int:
    """The bulk of the message (array data and frames); far cheaper than msg.ByteSize()."""
    tensors = (
        msg.timestamp,
        msg.joint_pos,
        msg.action,
        msg.intervention,
        msg.reward,
        msg.shadow_action,
    )
    return sum(len(t.data) for t in tensors) + sum(
        len(frame) for frames in frame_lists for frame in frames
    )


def _column(
    msg: trajectory_pb2.StepChunk,
    field: str,
    dtype: str,
    shape: tuple[int | None, ...],
    reject: _Reject,
) -> np.ndarray:
    if not msg.HasField(field):
        raise reject(field, f"missing; expected {dtype} of shape {_shape_text(shape)}")
    tensor: arrays_pb2.Tensor = getattr(msg, field)
    try:
        return from_tensor(tensor, field, dtype=dtype, shape=shape)
    except WireError as exc:
        # WireError already starts with the field name.
        raise reject(field, str(exc).removeprefix(f"{field}: ")) from None


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("T" if d is None else str(d) for d in shape) + ")"


def _cameras(
    msg: trajectory_pb2.StepChunk,
    frame_lists: list[list[bytes]],
    n: int,
    reject: _Reject,
    *,
    full_decode: bool,
) -> dict[str, CameraColumn]:
    if len(msg.cameras) > MAX_CAMERAS:
        raise reject("cameras", f"{len(msg.cameras)} cameras, at most {MAX_CAMERAS}")
    cameras: dict[str, CameraColumn] = {}
    for cam, frames in zip(msg.cameras, frame_lists, strict=True):
        if not is_safe_id(cam.camera):
            raise reject("cameras", f"camera name {cam.camera[:40]!r} is not a valid id")
        field = f"cameras[{cam.camera}]"
        if cam.camera in cameras:
            raise reject(field, "camera sent twice in one chunk")
        if cam.encoding not in ENCODINGS:
            raise reject(
                field, f"encoding {cam.encoding[:40]!r}, expected one of {sorted(ENCODINGS)}"
            )
        if not (0 < cam.height <= MAX_IMAGE_SIDE and 0 < cam.width <= MAX_IMAGE_SIDE):
            raise reject(field, f"image size {cam.height}x{cam.width} out of range")
        if cam.height * cam.width > MAX_IMAGE_PIXELS:
            raise reject(
                field,
                f"image size {cam.height}x{cam.width} is over {MAX_IMAGE_PIXELS} pixels",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
        if cam.channels not in (1, 3, 4):
            raise reject(field, f"{cam.channels} channels, expected 1, 3 or 4")
        if len(frames) != n:
            raise reject(field, f"{len(frames)} frames for {n} steps; send one per step")
        raw_sizes = {cam.height * cam.width * cam.channels * k for k in (1, 2)}
        for i, frame in enumerate(frames):
            step = msg.first_step + i
            if not frame:
                raise reject(field, f"empty frame at step {step}")
            problem = frame_problem(
                frame,
                cam.encoding,
                cam.height,
                cam.width,
                cam.channels,
                full_decode=full_decode,
            )
            if problem is not None:
                raise reject(field, f"frame at step {step} {problem}")
            if cam.encoding == "raw" and len(frame) not in raw_sizes:
                raise reject(
                    field,
                    f"raw frame at step {step} has {len(frame)} bytes, expected "
                    f"{cam.height}x{cam.width}x{cam.channels} of 1 or 2 bytes each",
                )
        cameras[cam.camera] = CameraColumn(
            camera=cam.camera,
            encoding=cam.encoding,
            height=int(cam.height),
            width=int(cam.width),
            channels=int(cam.channels),
            frames=frames,
        )
    return cameras


def _outcome(msg: trajectory_pb2.StepChunk, reject: _Reject) -> dict[str, Any] | None:
    has = msg.HasField("outcome")
    if msg.last and not has:
        raise reject("outcome", "missing on the last chunk; the closing chunk says how it ended")
    if not msg.last and has:
        raise reject("outcome", "set on a chunk that is not last; set last=true to close")
    if not has:
        return None
    out = msg.outcome
    if not (math.isfinite(out.started_at) and math.isfinite(out.ended_at)):
        raise reject("outcome", "started_at/ended_at must be finite")
    if len(out.reason) > 256:
        raise reject("outcome", "reason longer than 256 characters")
    return {
        "success": bool(out.success),
        "reason": out.reason,
        "started_at": float(out.started_at),
        "ended_at": float(out.ended_at),
    }

"""The byte format between a cell's actor and its servo process (actors/servo_process.py).

Two pipes, one each way, carry frames: a 5-byte header (payload length, kind) and the
payload. Steps and plans are fixed binary layouts (float32 joints, no pickle); events and
controls, rare, are JSON. Every step frame is far below PIPE_BUF, so the servo process's
non-blocking write of one is all or nothing: it never waits on the actor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from protos.joint_layout import JOINT_DIM

STEP = 1  # servo process -> actor: one tick (what was read and what was sent)
EVENT = 2  # servo process -> actor: JSON (ready, fault, stats, a control's answer)
PLAN = 3  # actor -> servo process: targets for the coming ticks
CONTROL = 4  # actor -> servo process: JSON (enable, hold, torque_off, stop)

MAX_FRAME_BYTES = 1 << 20  # a plan of 1,000 ticks is 56 kB: anything bigger is corruption
MAX_VERSION_BYTES = 200

_HEADER = struct.Struct("<IB")
_STEP_HEAD = struct.Struct("<qdddBB")  # tick, stamp, lateness, busy, intervention, version
_PLAN_HEAD = struct.Struct("<qBBH")  # first tick, intervention, version length, ticks
_JOINTS_BYTES = JOINT_DIM * 4


class WireError(ValueError):
    """A frame that does not parse: the other side is not a servo process of this kind."""


@dataclass(frozen=True)
class Step:
    """One tick of the servo process: `joints` read at `stamp`, then `sent` commanded.

    `lateness` is how late the tick started against its schedule, `busy` how long its work
    (read, gate, write) took; `intervention` and `version` say where `sent` came from (an
    operator's plan, or which policy version's)."""

    tick: int
    stamp: float
    lateness: float
    busy: float
    joints: np.ndarray
    sent: np.ndarray
    intervention: bool
    version: str


@dataclass(frozen=True)
class Plan:
    """Targets for ticks `first_tick`, `first_tick + 1`, ...; past the end, the last one."""

    first_tick: int
    targets: np.ndarray  # (n, 14) float32, n >= 1
    intervention: bool
    version: str


def frame(kind: int, payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), kind) + payload


def _version_bytes(version: str) -> bytes:
    raw = version.encode()
    if len(raw) > MAX_VERSION_BYTES:
        raise WireError(f"version id longer than {MAX_VERSION_BYTES} bytes: {version[:40]!r}...")
    return raw


def encode_step(step: Step) -> bytes:
    v = _version_bytes(step.version)
    head = _STEP_HEAD.pack(
        step.tick, step.stamp, step.lateness, step.busy, int(step.intervention), len(v)
    )
    joints = np.asarray(step.joints, "<f4").tobytes()
    sent = np.asarray(step.sent, "<f4").tobytes()
    return frame(STEP, head + v + joints + sent)


def decode_step(payload: bytes) -> Step:
    n = _STEP_HEAD.size
    if len(payload) < n:
        raise WireError(f"step frame of {len(payload)} bytes")
    tick, stamp, lateness, busy, intervention, vlen = _STEP_HEAD.unpack_from(payload)
    if len(payload) != n + vlen + 2 * _JOINTS_BYTES:
        raise WireError(f"step frame of {len(payload)} bytes, version of {vlen}")
    version = payload[n : n + vlen].decode()
    arrays = np.frombuffer(payload, "<f4", offset=n + vlen).astype(np.float32)
    joints, sent = arrays[:JOINT_DIM], arrays[JOINT_DIM:]
    return Step(tick, stamp, lateness, busy, joints, sent, bool(intervention), version)


def encode_plan(plan: Plan) -> bytes:
    targets = np.asarray(plan.targets, "<f4").reshape(-1, JOINT_DIM)
    if len(targets) == 0:
        raise WireError("a plan needs at least one target")
    v = _version_bytes(plan.version)
    head = _PLAN_HEAD.pack(plan.first_tick, int(plan.intervention), len(v), len(targets))
    return frame(PLAN, head + v + targets.tobytes())


def decode_plan(payload: bytes) -> Plan:
    n = _PLAN_HEAD.size
    if len(payload) < n:
        raise WireError(f"plan frame of {len(payload)} bytes")
    first, intervention, vlen, ticks = _PLAN_HEAD.unpack_from(payload)
    if ticks == 0 or len(payload) != n + vlen + ticks * _JOINTS_BYTES:
        raise WireError(f"plan frame of {len(payload)} bytes for {ticks} ticks")
    version = payload[n : n + vlen].decode()
    targets = np.frombuffer(payload, "<f4", offset=n + vlen).reshape(ticks, JOINT_DIM)
    if not np.all(np.isfinite(targets)):
        raise WireError("a plan with a non-finite target")
    return Plan(first, targets.astype(np.float32), bool(intervention), version)


def encode_json(kind: int, message: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(message).encode())


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except ValueError as exc:
        raise WireError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise WireError("a JSON message must be an object")
    return message


class FrameReader:
    """Cuts frames out of whatever bytes a pipe gave, keeping a partial one for later."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        while len(self._buf) >= _HEADER.size:
            length, kind = _HEADER.unpack_from(self._buf)
            if length > MAX_FRAME_BYTES or kind not in (STEP, EVENT, PLAN, CONTROL):
                raise WireError(f"frame header of kind {kind}, {length} bytes")
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            out.append((kind, bytes(self._buf[_HEADER.size : end])))
            del self._buf[:end]
        return out

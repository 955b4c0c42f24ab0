"""Shared memory between the simulated servo chain and a physics simulation.

The servo peer (drivers/sim/servo_peer.py) answers Dynamixel packets in its own process;
a physics sim (e.g. a MuJoCo cell) runs elsewhere. They meet in one POSIX shared-memory
block (`multiprocessing.shared_memory.SharedMemory(name=link.name)` opens it too; prefer
`ServoLink.attach(link.name)`, which keeps Python < 3.13 from unlinking it at exit). The
peer writes what the driver commanded (torque, operating mode, goal), the physics sim
writes what the servos measure (position, velocity, current, hardware error). Plain
fixed-offset fields, no locks and no pickles: each field is written by exactly one side,
and an aligned 8-byte store is atomic on the machines we run on, so a reader sees either
the old or the new value of each field.

Layout (little-endian). Header, 64 bytes:

    off  type  field
    0    8s    magic b"DXLLINK1"
    8    u32   layout version (1)
    12   u32   number of servos N
    16   f64   physics_stamp: time.monotonic() of the physics sim's last write (0 = never)
    24   f64   peer_stamp: time.monotonic() of the peer's last command write
    32   u64   command_count: +1 after every command write (written last, by the peer)
    40   ...   reserved (zero)

Then N records of 64 bytes, record i at offset 64 + 64 * i:

    off  type  field                 written by
    0    i32   servo id              creator
    4    u8    torque_enable (0/1)   peer
    5    u8    operating_mode        peer      (3 position, 5 current-based position, ...)
    6    u8    hardware_error        physics   (Hardware Error Status bits, e.g. 0x20)
    7    u8    reserved
    8    f64   goal_position  rad    peer
    16   f64   goal_current   mA     peer      (current limit in mode 5)
    24   f64   present_position rad  physics
    32   f64   present_velocity rad/s physics
    40   f64   present_current  mA   physics
    48   u64   goal_seq              peer      (+1 on every command write)
    56   u64   present_seq           physics   (+1 on every state write)

Angles are in the servo's *shaft frame*: radians about the raw centre tick 2048, before the
servo's homing offset and before the driver's direction sign. So the physics sim needs no
knowledge of calibration registers; it maps shaft angle to its joint with the arm's
calibration: joint = direction * (shaft + homing_offset * 2*pi/4096) for a joint, and
gripper = (shaft_ticks + homing_offset - closed_ticks) / (open_ticks - closed_ticks).

A physics step: for each servo `read_command`, drive the joint toward `goal_position` when
`torque_enable` (limiting effort to `goal_current` in mode 5), then `write_measurement`.
Commands change a few times a control tick and physics steps run 25 times as often, so a
physics sim first reads `command_count` (one load): while it is what it was when the
commands were last read, nothing new has been written (the count is stored after the fields
it covers, so reading it *before* the fields never hides a write).
Until the physics sim first writes, the peer reports the initial shaft positions it was
started with.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

MAGIC = b"DXLLINK1"
VERSION = 1
HEADER_SIZE = 64
RECORD_SIZE = 64
_HEADER = struct.Struct("<8sIIdd")
_ID = struct.Struct("<i")
_COMMAND = struct.Struct("<BBddQ")  # torque, mode at +4/+5; goal, current at +8/+16; seq +48
_PRESENT = struct.Struct("<ddd")  # +24
_U8 = struct.Struct("<B")
_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")
_COMMAND_ROW = struct.Struct("<BB2xdd24xQ")  # torque, mode, goal, current, goal_seq from +4
_FLAGS = struct.Struct("<BB")  # torque, operating mode at +4 (+6 is the physics side's)
_GOALS = struct.Struct("<dd")  # goal position, goal current at +8
_COMMAND_COUNT_OFF = 32


_SHM_DIR = "/dev/shm"


def link_size(n_servos: int) -> int:
    return HEADER_SIZE + RECORD_SIZE * n_servos


@dataclass(frozen=True)
class ServoCommand:
    """What the driver asked one servo to do (peer -> physics)."""

    servo_id: int
    torque_enable: bool
    operating_mode: int
    goal_position: float  # rad, shaft frame
    goal_current: float  # mA
    seq: int


@dataclass(frozen=True)
class ServoMeasurement:
    """What one servo measures (physics -> peer)."""

    servo_id: int
    position: float  # rad, shaft frame
    velocity: float  # rad/s
    current: float  # mA
    hardware_error: int
    seq: int


class ServoLink:
    """One shared-memory block for a chain of servos; see the module docstring for layout.

    `create` makes (and owns: `unlink` removes) the block; `attach` opens an existing one by
    name from any process without registering it with that process's resource tracker (so
    the attaching process never unlinks it on exit).
    """

    def __init__(
        self, buf: Any, name: str, closer: Any, unlinker: Callable[[], None] | None = None
    ) -> None:
        self._buf = buf
        self.name = name
        self._closer = closer
        self._unlinker = unlinker
        self.owner = unlinker is not None
        magic, version, n, _, _ = _HEADER.unpack_from(buf, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"shared memory {name!r} is not a servo link v{VERSION}")
        self.servo_ids: tuple[int, ...] = tuple(
            _ID.unpack_from(buf, HEADER_SIZE + RECORD_SIZE * i)[0] for i in range(n)
        )
        self._index = {sid: i for i, sid in enumerate(self.servo_ids)}

    @classmethod
    def create(cls, servo_ids: Sequence[int]) -> ServoLink:
        """A new block, owned by this process (`unlink` removes it).

        The block is POSIX shared memory like `multiprocessing.shared_memory` makes, but on
        Python < 3.13 it is made without that module's resource tracker: the tracker is an
        extra process that outlives every test and unlinks blocks behind the owner's back.
        """
        ids = [int(s) for s in servo_ids]
        if len(set(ids)) != len(ids) or not ids:
            raise ValueError(f"servo ids must be unique and non-empty, got {ids}")
        size = link_size(len(ids))
        buf: Any
        closer: Any
        unlinker: Callable[[], None]
        if sys.version_info >= (3, 13):
            shm = shared_memory.SharedMemory(create=True, size=size, track=False)  # type: ignore[call-arg]
            buf, closer, name, unlinker = shm.buf, shm, shm.name, shm.unlink
        elif os.path.isdir(_SHM_DIR):
            name = f"dxllink_{secrets.token_hex(8)}"
            path = os.path.join(_SHM_DIR, name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            buf, closer = memoryview(mm), mm

            def unlinker() -> None:
                os.unlink(path)

        else:  # no /dev/shm to map: the tracked kind
            shm = shared_memory.SharedMemory(create=True, size=size)
            buf, closer, name, unlinker = shm.buf, shm, shm.name, shm.unlink
        buf[:size] = bytes(size)
        _HEADER.pack_into(buf, 0, MAGIC, VERSION, len(ids), 0.0, 0.0)
        for i, sid in enumerate(ids):
            _ID.pack_into(buf, HEADER_SIZE + RECORD_SIZE * i, sid)
        return cls(buf, name, closer, unlinker)

    @classmethod
    def attach(cls, name: str) -> ServoLink:
        """Open an existing block by name (not owned: `unlink` is the creator's job)."""
        if sys.version_info >= (3, 13):
            shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
            return cls(shm.buf, name, shm)
        # Python < 3.13 registers every attached block with a resource tracker that unlinks
        # it when this process exits; map the POSIX object directly instead (Linux).
        fd = os.open(os.path.join(_SHM_DIR, name.lstrip("/")), os.O_RDWR)
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return cls(memoryview(mm), name, mm)

    def _off(self, servo_id: int) -> int:
        try:
            return HEADER_SIZE + RECORD_SIZE * self._index[servo_id]
        except KeyError:
            raise KeyError(f"servo id {servo_id} is not in link {self.name!r}") from None

    # Peer side -------------------------------------------------------------------------

    def write_command(
        self,
        servo_id: int,
        torque_enable: bool,
        operating_mode: int,
        goal_position: float,
        goal_current: float,
    ) -> None:
        buf = self._buf
        off = self._off(servo_id)
        seq = _U64.unpack_from(buf, off + 48)[0] + 1
        _FLAGS.pack_into(buf, off + 4, 1 if torque_enable else 0, operating_mode & 0xFF)
        _GOALS.pack_into(buf, off + 8, goal_position, goal_current)
        _U64.pack_into(buf, off + 48, seq)
        _F64.pack_into(buf, 24, time.monotonic())
        count = _U64.unpack_from(buf, _COMMAND_COUNT_OFF)[0] + 1
        _U64.pack_into(buf, _COMMAND_COUNT_OFF, count)

    def read_measurement(self, servo_id: int) -> ServoMeasurement:
        off = self._off(servo_id)
        pos, vel, cur = _PRESENT.unpack_from(self._buf, off + 24)
        return ServoMeasurement(
            servo_id=servo_id,
            position=pos,
            velocity=vel,
            current=cur,
            hardware_error=_U8.unpack_from(self._buf, off + 6)[0],
            seq=_U64.unpack_from(self._buf, off + 56)[0],
        )

    def read_present(self, servo_id: int) -> tuple[float, float, float, int]:
        """(position, velocity, current, hardware error) of one servo: read_measurement
        without building a ServoMeasurement, for the peer's every register read."""
        off = self._off(servo_id)
        pos, vel, cur = _PRESENT.unpack_from(self._buf, off + 24)
        return pos, vel, cur, self._buf[off + 6]

    # Physics side ----------------------------------------------------------------------

    @property
    def command_count(self) -> int:
        """How many command writes the peer has made; read it before `read_command`, and
        while it is unchanged the commands are too."""
        return int(_U64.unpack_from(self._buf, _COMMAND_COUNT_OFF)[0])

    def read_command(self, servo_id: int) -> ServoCommand:
        off = self._off(servo_id)
        torque = _U8.unpack_from(self._buf, off + 4)[0]
        mode = _U8.unpack_from(self._buf, off + 5)[0]
        goal, current = struct.unpack_from("<dd", self._buf, off + 8)
        return ServoCommand(
            servo_id=servo_id,
            torque_enable=bool(torque),
            operating_mode=mode,
            goal_position=goal,
            goal_current=current,
            seq=_U64.unpack_from(self._buf, off + 48)[0],
        )

    def read_command_fields(self, servo_id: int) -> tuple[int, int, float, float, int]:
        """(torque_enable, operating_mode, goal_position, goal_current, seq) of one servo:
        read_command without building a ServoCommand, for the physics side's every look."""
        torque, mode, goal, current, seq = _COMMAND_ROW.unpack_from(
            self._buf, self._off(servo_id) + 4
        )
        return torque, mode, goal, current, seq

    def write_positions(self, measured: Sequence[tuple[int, float, float]]) -> None:
        """write_measurement(servo_id, position, velocity) for each (servo_id, position,
        velocity), with one physics stamp for the lot (the physics side's every publish)."""
        buf = self._buf
        for servo_id, position, velocity in measured:
            off = self._off(servo_id)
            _PRESENT.pack_into(buf, off + 24, position, velocity, 0.0)
            _U64.pack_into(buf, off + 56, _U64.unpack_from(buf, off + 56)[0] + 1)
        _F64.pack_into(buf, 16, time.monotonic())

    def write_measurement(
        self,
        servo_id: int,
        position: float,
        velocity: float = 0.0,
        current: float = 0.0,
        hardware_error: int | None = None,
    ) -> None:
        off = self._off(servo_id)
        _PRESENT.pack_into(self._buf, off + 24, position, velocity, current)
        if hardware_error is not None:
            _U8.pack_into(self._buf, off + 6, hardware_error & 0xFF)
        seq = _U64.unpack_from(self._buf, off + 56)[0] + 1
        _U64.pack_into(self._buf, off + 56, seq)
        _F64.pack_into(self._buf, 16, time.monotonic())

    @property
    def physics_stamp(self) -> float:
        return float(_F64.unpack_from(self._buf, 16)[0])

    @property
    def peer_stamp(self) -> float:
        return float(_F64.unpack_from(self._buf, 24)[0])

    # Lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap this process's view (the block lives on until the owner unlinks it)."""
        if self._closer is None:
            return
        buf, closer = self._buf, self._closer
        self._buf = None
        self._closer = None
        if isinstance(buf, memoryview) and not isinstance(closer, shared_memory.SharedMemory):
            buf.release()
        closer.close()

    def unlink(self) -> None:
        """Remove the block (owner only); safe to call twice."""
        if not self.owner:
            raise RuntimeError(f"servo link {self.name!r} is attached, not owned")
        unlinker, self._unlinker = self._unlinker, None
        if unlinker is not None:
            with contextlib.suppress(FileNotFoundError):
                unlinker()

    def __enter__(self) -> ServoLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.owner:
            self.unlink()

"""A cell's durable on-disk spool: every StepChunk is on local disk before it goes on the wire.

Why: a learner restart, a network outage or an actor crash must not lose a recorded step.
The uplink writes each chunk here first and deletes it only when the learner acks it
durable; on start the actor reloads what is still here and resends it in order (the
learner stores each (cell_id, episode_id, seq) once, so a resend is harmless).

Layout: one file per chunk, `<n:016d>.chunk`, where n is the cell's submission number
(increasing across restarts). A file is a 16-byte header (magic, payload length, CRC32)
followed by the chunk's serialized protobuf bytes (never pickle). It is written as
`.<n>.tmp`, fsynced, renamed into place, and the directory is fsynced: the rename is the
commit, so a SIGKILL at any point leaves either no file or a complete one. Leftover temp
files are removed on open; a file that fails its header or CRC check (a torn disk, a
manual edit) is moved to `corrupt/` and counted, never sent.

Quota policy when the spool is full (bytes, per cell): what is already spooled is kept and
new chunks are refused, and once a chunk of an episode is refused every later chunk of
that episode is refused too. Dropping the *oldest* chunks instead would tear holes into
episodes already recorded (the learner stores an episode's chunks strictly in seq order,
so one hole makes everything after it unstorable); refusing the tail keeps every episode
the learner gets a clean prefix, which it closes as truncated. The uplink counts every
refused chunk and step, logs it with the cell and episode, and reports a `spool_full`
fault (heartbeat `last_fault`, actor stats). The control loop never waits on any of this.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from protos.fleetlearn.v1 import trajectory_pb2

log = logging.getLogger(__name__)

MAGIC = b"FLSP"
VERSION = 1
_HEADER = struct.Struct("<4sHHII")  # magic, version, reserved, payload length, crc32
HEADER_BYTES = _HEADER.size
SUFFIX = ".chunk"


class SpoolError(Exception):
    """A spool file that cannot be trusted (bad header, length or checksum)."""


@dataclass(frozen=True)
class SpoolRecord:
    """One chunk on disk: its submission number, path and size in bytes (header included)."""

    n: int
    path: Path
    size: int


def encode_record(payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, 0, len(payload), zlib.crc32(payload)) + payload


def decode_record(data: bytes) -> bytes:
    """The payload of one spool file; raises SpoolError if it is not whole and intact."""
    if len(data) < HEADER_BYTES:
        raise SpoolError(f"{len(data)} bytes, shorter than the header")
    magic, version, _, length, crc = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise SpoolError(f"bad magic/version {magic!r}/{version}")
    payload = data[HEADER_BYTES:]
    if len(payload) != length:
        raise SpoolError(f"payload is {len(payload)} bytes, header says {length}")
    if zlib.crc32(payload) != crc:
        raise SpoolError("checksum mismatch")
    return payload


def _parse(record: bytes) -> trajectory_pb2.StepChunk:
    """A spooled chunk. Fields this version does not know are dropped, so a chunk spooled
    before the token moved to call credentials (its old field 15) never sends it again."""
    chunk = trajectory_pb2.StepChunk.FromString(decode_record(record))
    chunk.DiscardUnknownFields()
    return chunk


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChunkSpool:
    """Durable, ordered storage of unacked chunks in one directory with a byte quota.

    The uplink's writer thread calls `write` while its stream thread calls `delete`; a
    small lock keeps the byte count right, and no disk I/O happens under it.
    """

    def __init__(self, directory: Path | str, quota_bytes: int, *, fsync: bool = True) -> None:
        if quota_bytes < 1:
            raise ValueError(f"quota_bytes must be >= 1, got {quota_bytes}")
        self.directory = Path(directory)
        self.quota_bytes = int(quota_bytes)
        self.fsync = fsync
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}
        self.used_bytes = 0
        self.corrupt = 0

    # -- opening -------------------------------------------------------------------------

    def recover(self) -> list[tuple[SpoolRecord, trajectory_pb2.StepChunk]]:
        """Chunks left by an earlier run, in submission order; cleans temp and bad files."""
        for tmp in self.directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        out: list[tuple[SpoolRecord, trajectory_pb2.StepChunk]] = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                n = int(path.name[: -len(SUFFIX)])
            except ValueError:
                continue
            try:
                data = path.read_bytes()
                chunk = _parse(data)
            except Exception as exc:  # SpoolError or a protobuf DecodeError
                self._quarantine(path, str(exc))
                continue
            record = SpoolRecord(n, path, len(data))
            self._sizes[n] = record.size
            self.used_bytes += record.size
            out.append((record, chunk))
        if out:
            log.info(
                "spool %s: %d unacked chunks (%d bytes) recovered from an earlier run",
                self.directory,
                len(out),
                self.used_bytes,
            )
        return out

    def next_number(self) -> int:
        """The first submission number not used by a recovered file."""
        return max(self._sizes, default=-1) + 1

    # -- writing and deleting ---------------------------------------------------------

    def fits(self, extra_bytes: int) -> bool:
        return self.used_bytes + extra_bytes <= self.quota_bytes

    def write(self, n: int, payload: bytes) -> SpoolRecord:
        """Make `payload` (a serialized StepChunk) durable as record `n`."""
        data = encode_record(payload)
        path = self.path_of(n)
        tmp = self.directory / f".{n:016d}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self.fsync:
            _fsync_dir(self.directory)
        with self._lock:
            self._sizes[n] = len(data)
            self.used_bytes += len(data)
        return SpoolRecord(n, path, len(data))

    def read(self, n: int) -> trajectory_pb2.StepChunk:
        return _parse(self.path_of(n).read_bytes())

    def delete(self, n: int) -> None:
        """Forget record `n` (acked durable). A crash before the unlink reaches the disk
        only means one resend, which the learner acks as a duplicate."""
        with self._lock:
            size = self._sizes.pop(n, None)
            if size is None:
                return
            self.used_bytes -= size
        self.path_of(n).unlink(missing_ok=True)

    @property
    def chunks(self) -> int:
        return len(self._sizes)

    def path_of(self, n: int) -> Path:
        return self.directory / f"{n:016d}{SUFFIX}"

    def _quarantine(self, path: Path, why: str) -> None:
        self.corrupt += 1
        bad = self.directory / "corrupt"
        bad.mkdir(exist_ok=True)
        os.replace(path, bad / path.name)
        log.error("spool %s: %s is corrupt (%s); moved to %s", self.directory, path.name, why, bad)

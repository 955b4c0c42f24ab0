"""Writing zarr v3 files directly: every use of zarr's private modules lives here.

Why: zarr's per-array async write machinery costs several milliseconds per append, so the
episode store's hot path (learner/store.py) writes the files zarr would write itself: each
array's and group's zarr.json (templates made once by zarr, in memory) and the chunk files
of the `bytes` / `vlen-bytes` codecs, optionally zstd, byte for byte what zarr writes.
Files that may hold committed rows are replaced atomically (`replace_file`) or patched past
the committed bytes only; every write is recorded (`collecting`) so the store can fsync
exactly what an append touched. Layouts this code cannot encode go through zarr itself
(`write_with_zarr`).

Decision (issue #15), measured on this 2-core machine under load (load average 6-10):
zarr's public API with whole-chunk aligned writes (`arr[start:end] = block`, chunks of one
upload, attributes as the commit) stored 0.41-0.90x the direct writer's rows per second
and 0.53x its rows per CPU second with three JPEG cameras, and 0.18x / 0.13x with joints
only (the 64-light-cell case, where per-call overhead is all there is); the sharding codec
rewrites a whole shard on each append and reached 0.07-0.13x. So the direct writer stays,
isolated in this module, with zarr pinned to the minor range it was tested against
(pyproject.toml). It needs a POSIX file system (atomic rename, positioned writes): an
fsspec object store is not a target of this writer. tests/test_zarr_layout.py fails on any
change of the bytes layout (against zarr's own output and a committed expectation);
tests/test_layering.py fails on a private zarr import anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs.zstd import Zstd
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.sync import sync
from zarr.dtype import VariableLengthBytes
from zarr.errors import UnstableSpecificationWarning

from learner.group_commit import Touched

# (capacity, rows needed) -> new capacity: the store's allocation policy.
Grow = Callable[[int, int], int]

# zarr warns whenever it writes the metadata of a variable-length-bytes array, because that
# data type has no ratified zarr v3 spec yet. Our frames are opaque encoded images that only
# this code reads, so the warning says nothing actionable and would repeat on every append.
# catch_warnings swaps process-wide state, so the swap is serialised by this lock.
_WARNINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_vlen_bytes() -> Iterator[None]:
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        yield


def put_json(path: Path, doc: dict[str, Any]) -> None:
    """Replace a zarr.json (a commit, when it is a group's) in one atomic rename. Not
    indented, unlike zarr's own: json's C encoder only runs without indent (5x faster)."""
    mkdirs(path.parent)
    replace_file(path, [json.dumps(doc).encode()])


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return doc if isinstance(doc, dict) else {}


VLEN = "variable_length_bytes"


@functools.cache
def _group_template_json() -> str:
    return (
        GroupMetadata(zarr_format=3)
        .to_buffer_dict(default_buffer_prototype())["zarr.json"]
        .to_bytes()
        .decode()
    )


def group_template() -> dict[str, Any]:
    """An empty group's zarr.json as zarr itself writes it."""
    doc = json.loads(_group_template_json())
    assert isinstance(doc, dict)
    return doc


@functools.cache
def _array_template_json(dtype: str, tail: tuple[int, ...], rows: int, compressed: bool) -> str:
    with quiet_vlen_bytes():
        arr = zarr.create_array(
            zarr.storage.MemoryStore(),
            shape=(rows, *tail),
            chunks=(rows, *tail),
            dtype=VariableLengthBytes() if dtype == VLEN else dtype,
            compressors="auto" if compressed else None,
        )
        docs = arr.metadata.to_buffer_dict(default_buffer_prototype())
    return docs["zarr.json"].to_bytes().decode()


def array_template(
    dtype: str, tail: tuple[int, ...], rows: int, compressed: bool
) -> dict[str, Any]:
    """A new array's zarr.json exactly as zarr would write it (made once per layout, in
    memory, by zarr itself)."""
    doc = json.loads(_array_template_json(dtype, tail, rows, compressed))
    assert isinstance(doc, dict)
    return doc


def write_with_zarr(
    items: list[tuple[zarr.Array, np.ndarray]], start: int, end: int, grow: Grow
) -> None:
    """Rows [start, end) of arrays the direct writer does not handle, through zarr itself
    (all arrays at once on zarr's event loop); `grow` sizes an array that is too short."""
    sync(_write_all(items, start, end, grow))


async def _write_all(
    items: list[tuple[zarr.Array, np.ndarray]], start: int, end: int, grow: Grow
) -> None:
    await asyncio.gather(*(_write_rows(arr.async_array, v, start, end, grow) for arr, v in items))


async def _write_rows(arr: Any, values: np.ndarray, start: int, end: int, grow: Grow) -> None:
    if arr.shape[0] < end:
        await arr.resize((grow(int(arr.shape[0]), end), *arr.shape[1:]))
    await arr.setitem(slice(start, end), values)


class DirectArray:
    """Writes one zarr array's chunk files the way zarr would, without zarr's async machinery.

    Only layouts this code can encode byte for byte are accepted (`of` returns None
    otherwise): a regular grid chunked along time only, '/'-separated default chunk keys,
    and the `bytes` (little-endian) or `vlen-bytes` codec optionally followed by zstd. A
    chunk that starts at or after the append's first row is written fresh, in place (unwritten
    rows hold the fill value, and lie past n_steps where readers never look). A chunk whose
    earlier rows may be committed gets the new rows written in place when it is uncompressed
    fixed-size data, and is otherwise read back and replaced whole (atomically)."""

    __slots__ = (
        "_dirs",
        "dtype",
        "fill",
        "key_tail",
        "meta",
        "path",
        "rows",
        "tail",
        "vlen",
        "zstd",
    )

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        rows: int,
        tail: tuple[int, ...],
        dtype: np.dtype | None,
        fill: Any,
        zstd: Zstd | None,
    ) -> None:
        self.path = path
        self.meta = meta  # the array's zarr.json, as last written
        self.rows = rows
        self.tail = tail
        self.dtype = dtype  # little-endian numeric dtype, or None for variable-length bytes
        self.vlen = dtype is None
        self.fill = fill
        self.zstd = zstd
        self.key_tail = "/0" * len(tail)  # trailing dimensions are one chunk wide
        self._dirs: set[Path] = set()

    @classmethod
    def of(cls, meta: dict[str, Any], path: Path) -> DirectArray | None:
        """The direct writer of the array whose zarr.json is `meta`, if its layout allows."""
        try:
            return cls._of(meta, path)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    @classmethod
    def _of(cls, meta: dict[str, Any], path: Path) -> DirectArray | None:
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            return None
        if meta.get("storage_transformers"):
            return None
        grid, keys = meta["chunk_grid"], meta["chunk_key_encoding"]
        shape, chunks = list(meta["shape"]), list(grid["configuration"]["chunk_shape"])
        if grid["name"] != "regular" or len(chunks) != len(shape) or chunks[1:] != shape[1:]:
            return None
        if keys["name"] != "default" or keys.get("configuration", {}).get("separator") != "/":
            return None
        codecs = list(meta["codecs"])
        zstd: Zstd | None = None
        if len(codecs) == 2 and codecs[1]["name"] == "zstd":
            conf = codecs[1].get("configuration", {})
            zstd = Zstd(level=int(conf.get("level", 0)), checksum=bool(conf.get("checksum")))
            codecs = codecs[:1]
        if len(codecs) != 1:
            return None
        first, data_type, fill = codecs[0], meta["data_type"], meta["fill_value"]
        rows, tail = int(chunks[0]), tuple(int(n) for n in shape[1:])
        if data_type == VLEN and first["name"] == "vlen-bytes" and not tail:
            return cls(path, meta, rows, tail, None, b"", zstd)
        if first["name"] != "bytes" or data_type not in _NUMERIC or isinstance(fill, str):
            return None
        dtype = np.dtype(data_type)
        endian = first.get("configuration", {}).get("endian")
        if dtype.itemsize > 1 and endian != "little":
            return None
        return cls(path, meta, rows, tail, dtype.newbyteorder("<"), fill, zstd)

    def reserve(self, end: int, grow: Grow) -> None:
        """Grow the array's capacity (its zarr.json shape) to hold `end` rows, if needed, to
        `grow(capacity, end)` rows."""
        capacity = int(self.meta["shape"][0])
        if capacity < end:
            self.meta["shape"] = [grow(capacity, end), *self.tail]
            put_json(self.path / "zarr.json", self.meta)

    def write(self, values: Any, start: int, end: int) -> None:
        rows = self.rows
        for index in range(start // rows, (end - 1) // rows + 1):
            lo = index * rows
            a, b = max(start, lo), min(end, lo + rows)
            if self.vlen:
                self._write_frames(index, values[a - start : b - start], a - lo, lo < a)
            else:
                self._write_numbers(index, values[a - start : b - start], a - lo, lo < a)

    def _write_numbers(self, index: int, values: np.ndarray, at: int, keep: bool) -> None:
        assert self.dtype is not None
        rows = np.ascontiguousarray(values, dtype=self.dtype)
        if keep and self.zstd is None and self._patch(index, rows, at):
            return
        buf = (
            self._read_numbers(index)
            if keep
            else np.full((self.rows, *self.tail), self.fill, dtype=self.dtype)
        )
        buf[at : at + len(rows)] = rows
        self._put(index, [buf if self.zstd is None else self.zstd.encode(buf)], atomic=keep)

    def _patch(self, index: int, rows: np.ndarray, at: int) -> bool:
        """Write only the new rows into an uncompressed chunk file, in place: the bytes of
        the rows before them (committed ones) are never touched, so no reader or crash can
        see them torn. False when the file is not a whole chunk (then it is rewritten)."""
        row_bytes = rows.itemsize * int(np.prod(self.tail, dtype=np.int64))
        path = self.path / f"c/{index}{self.key_tail}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        note_written(path, named=False)
        try:
            if os.fstat(fd).st_size != self.rows * row_bytes:
                return False
            data = memoryview(rows).cast("B")
            offset = at * row_bytes
            while data:
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
            return True
        finally:
            os.close(fd)

    def _read_numbers(self, index: int) -> np.ndarray:
        assert self.dtype is not None
        data = self._read(index)
        if data is None:
            return np.full((self.rows, *self.tail), self.fill, dtype=self.dtype)
        flat = np.frombuffer(data, dtype=self.dtype)
        return flat.reshape((self.rows, *self.tail)).copy()

    def _write_frames(self, index: int, values: list[bytes], at: int, keep: bool) -> None:
        items: list[bytes] = _vlen_decode(self._read(index), self.rows) if keep else []
        items = items + [b""] * (self.rows - len(items))
        items[at : at + len(values)] = values
        pieces: list[Any] = [struct.pack("<I", self.rows)]
        for item in items:
            pieces.append(struct.pack("<I", len(item)))
            pieces.append(item)
        if self.zstd is not None or len(pieces) > _MAX_PIECES:
            joined = b"".join(pieces)
            pieces = [joined if self.zstd is None else self.zstd.encode(joined)]
        self._put(index, pieces, atomic=keep)

    def _read(self, index: int) -> bytes | None:
        try:
            data = (self.path / f"c/{index}{self.key_tail}").read_bytes()
        except FileNotFoundError:
            return None
        return data if self.zstd is None else bytes(self.zstd.decode(data))

    def _put(self, index: int, pieces: list[Any], *, atomic: bool) -> None:
        """Replace the chunk file atomically when it may hold committed rows (`atomic`);
        one whose rows all lie past the commit is written in place (no reader looks at it,
        and a torn one is rewritten whole by the resend), saving a create and a rename."""
        path = self.path / f"c/{index}{self.key_tail}"
        if path.parent not in self._dirs:
            mkdirs(path.parent)
            self._dirs.add(path.parent)
        if atomic:
            replace_file(path, pieces)
            return
        note_written(path, named=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            write_fd(fd, pieces)
        finally:
            os.close(fd)


_NUMERIC = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
    | {"float16", "float32", "float64"}
)
_MAX_PIECES = 512  # well below IOV_MAX (1024): more pieces are joined into one write
_TEMP_IDS = itertools.count()


def replace_file(path: Path, pieces: list[Any]) -> None:
    """Write `pieces` to `path` atomically: a temporary file in the same directory, renamed
    over the old one, so a reader or a crash sees the old file or the new one, never a torn
    one. Temporary names end in .partial, like zarr's own LocalStore."""
    note_written(path, named=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{next(_TEMP_IDS)}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        try:
            write_fd(fd, pieces)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_COLLECTOR = threading.local()


@contextlib.contextmanager
def collecting() -> Iterator[Touched]:
    """Collect what this thread writes meanwhile (files, new names, new directories): what
    an append must have flushed before its ack."""
    outer = getattr(_COLLECTOR, "touched", None)
    _COLLECTOR.touched = touched = Touched()
    try:
        yield touched
    finally:
        _COLLECTOR.touched = outer


def note_written(path: Path, *, named: bool) -> None:
    """`path` was written; `named`: under a new name (created or renamed into place)."""
    touched = getattr(_COLLECTOR, "touched", None)
    if touched is not None:
        touched.files.add(path)
        if named:
            touched.named.add(path)


def mkdirs(path: Path) -> None:
    """mkdir -p that records each directory it creates (its entry must reach the disk)."""
    if path.is_dir():
        return
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
        note_written(directory, named=True)


def write_fd(fd: int, pieces: list[Any]) -> None:
    """One writev of every piece (no join copy of the frames); a short write finishes the rest."""
    total = sum(memoryview(p).nbytes for p in pieces)
    done = os.writev(fd, pieces)
    if done < total:
        rest = memoryview(b"".join(bytes(memoryview(p).cast("B")) for p in pieces))[done:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def _vlen_decode(data: bytes | None, rows: int) -> list[bytes]:
    """The items of a vlen-bytes chunk (u32 count, then u32 length + bytes per item)."""
    if data is None:
        return []
    view = memoryview(data)
    (count,) = struct.unpack_from("<I", view, 0)
    if count != rows:
        raise RuntimeError(f"vlen-bytes chunk holds {count} items, expected {rows}")
    out, pos = [], 4
    for _ in range(count):
        (size,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + size > len(view):
            raise RuntimeError("vlen-bytes chunk is truncated")
        out.append(bytes(view[pos : pos + size]))
        pos += size
    return out

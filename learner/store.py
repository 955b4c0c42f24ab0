"""The episode store: zarr v3, one group per episode at episodes/<cell_id>/<episode_id>/.

Each group holds arrays along time (timestamp, joint_pos, action, intervention, reward) and a
`cameras` subgroup with one array of encoded frames per camera. The group's attributes are
the commit record: `n_steps` and `next_seq` move only after a whole chunk's rows are written,
and readers trust rows below `n_steps` only (arrays are allocated ahead, so their shape
is a capacity, not a length). Every zarr.json is replaced atomically (the
LocalStore writes a temporary file and renames it), so a crash between the data and the
commit leaves the old commit in place and the actor's resend rewrites the same rows.

Idempotency is by (cell_id, episode_id, seq): a seq below `next_seq` was stored before and is
acked as a duplicate; a seq above it is a gap the actor must fill first.

One process writes a given episode (ingest); any number of processes may read. Within the
writing process a lock per episode lets several streams write different episodes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import zarr
from zarr.core.sync import sync
from zarr.dtype import VariableLengthBytes
from zarr.errors import UnstableSpecificationWarning
from zarr.storage import LocalStore

from learner.chunks import ChunkRejected, DecodedChunk, is_safe_id
from protos.joint_layout import JOINT_DIM

log = logging.getLogger(__name__)

EPISODES = "episodes"
CAMERAS = "cameras"
# Rows per zarr chunk of the small per-step columns: an episode usually fits one file, and
# rewriting a partly filled 1024-row chunk on each append costs well under a millisecond.
STEP_CHUNK_ROWS = 1024
# Frames are big; their zarr chunk length follows the first uploaded chunk's step count so
# that each later append of the same size writes fresh files instead of rewriting old ones.
MAX_FRAME_CHUNK_ROWS = 128
# Arrays are allocated this many rows ahead at first, then doubled when full: an append then
# writes chunk data and the commit only. Rows past n_steps are unwritten fill, never read.
MIN_CAPACITY_ROWS = 1024
# Episodes whose open array handles are kept (writers of live episodes, one per stream).
MAX_OPEN_EPISODES = 512

# name -> (dtype, trailing shape)
_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "timestamp": ("float64", ()),
    "joint_pos": ("float32", (JOINT_DIM,)),
    "action": ("float32", (JOINT_DIM,)),
    "intervention": ("bool", ()),
    "reward": ("float32", ()),
}

# zarr warns whenever it writes the metadata of a variable-length-bytes array, because that
# data type has no ratified zarr v3 spec yet. Our frames are opaque encoded images that only
# this code reads, so the warning says nothing actionable and would repeat on every append.
# catch_warnings swaps process-wide state, so the swap is serialised by this lock.
_WARNINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_vlen_bytes() -> Iterator[None]:
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        yield


@dataclass(frozen=True)
class AppendResult:
    duplicate: bool
    episode_complete: bool
    steps_written: int
    # The episode as committed after this append: what an end-of-episode callback needs,
    # without reading the episode back from the store on the ack path.
    episode_steps: int = 0
    intervention_steps: int = 0


@dataclass(frozen=True)
class EpisodeSummary:
    """A finished episode's counts, as its last append committed them."""

    steps: int
    intervention_steps: int


@dataclass(frozen=True, order=True)
class EpisodeRef:
    cell_id: str
    episode_id: str

    @property
    def path(self) -> str:
        return f"{EPISODES}/{self.cell_id}/{self.episode_id}"


@dataclass
class EpisodeData:
    """One episode's committed rows (n_steps of them) and its attributes."""

    ref: EpisodeRef
    attrs: dict[str, Any]
    timestamp: np.ndarray
    joint_pos: np.ndarray
    action: np.ndarray
    intervention: np.ndarray
    reward: np.ndarray
    frames: dict[str, list[bytes]] = field(default_factory=dict)


class _EpisodeLock:
    """A lock that can be weakly referenced, so idle episodes' locks are collected."""

    __slots__ = ("__weakref__", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()


class EpisodeStore:
    """Append-only episode storage shared by ingest (writer) and the sampler (readers)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._zstore = LocalStore(self.root)
        self._guard = threading.Lock()
        self._locks: weakref.WeakValueDictionary[EpisodeRef, _EpisodeLock] = (
            weakref.WeakValueDictionary()
        )
        # n_steps of episodes seen complete: a complete episode never changes again.
        self._complete: dict[EpisodeRef, int] = {}
        # Open array handles of episodes being written, least recently used first.
        self._writers: OrderedDict[EpisodeRef, _Writer] = OrderedDict()
        with self._guard:
            zarr.open_group(self._zstore, mode="a").require_group(EPISODES)

    # ------------------------------------------------------------------ writing

    def append(self, chunk: DecodedChunk) -> AppendResult:
        """Store `chunk` once; a resend of a stored seq is a duplicate and writes nothing."""
        ref = EpisodeRef(chunk.cell_id, chunk.episode_id)
        where = f"cell {ref.cell_id} episode {ref.episode_id} seq {chunk.seq}"
        with self._episode_lock(ref):
            attrs = self._attrs(ref)
            if attrs is None:
                if chunk.seq != 0:
                    raise ChunkRejected(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"{where}: the learner has no such episode, expected seq 0 first",
                    )
                self._forget(ref)
                self._create(ref, chunk)
                attrs = self._attrs(ref)
                assert attrs is not None
            next_seq, n_stored = int(attrs["next_seq"]), int(attrs["n_steps"])
            if chunk.seq < next_seq:
                return AppendResult(True, bool(attrs["complete"]), 0)
            if attrs["complete"]:
                raise ChunkRejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{where}: episode already complete after seq {next_seq - 1}",
                )
            if chunk.seq > next_seq:
                raise ChunkRejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{where}: gap, expected seq {next_seq}; resend from there",
                )
            if chunk.first_step != n_stored:
                raise ChunkRejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{where}: first_step {chunk.first_step}, but the episode holds "
                    f"{n_stored} steps; expected first_step {n_stored}",
                )
            self._check_consistent(where, attrs, chunk)
            end = n_stored + chunk.n_steps
            handles = self._handles(ref, attrs, chunk, n_stored)
            commit = self._commit_attrs(attrs, chunk, end)
            try:
                # Rows, then the commit point: after the one atomic metadata write of the
                # attributes the rows are visible; a crash before it leaves the old commit.
                handles.write(chunk, n_stored, end, commit)
            except BaseException:
                self._forget(ref)
                raise
            handles.seen = _fingerprint({**attrs, **commit})
            if chunk.last:
                self._forget(ref)
            if attrs.get("truncated"):
                log.info("cell %s episode %s: resumed after being marked truncated", *_ids(ref))
            if chunk.last:
                with self._guard:
                    self._complete[ref] = end
                log.info(
                    "cell %s episode %s complete: %d steps, version %s",
                    ref.cell_id,
                    ref.episode_id,
                    end,
                    chunk.policy_version or "none",
                )
            return AppendResult(
                False, chunk.last, chunk.n_steps, end, int(commit["intervention_steps"])
            )

    def mark_truncated(self, ref: EpisodeRef, reason: str) -> None:
        """Flag an episode that will never be finished (e.g. its cell died mid-episode)."""
        with self._episode_lock(ref):
            group = self._open(ref, mode="r+")
            if group is None:
                raise KeyError(f"no episode {ref.cell_id}/{ref.episode_id} in {self.root}")
            if group.attrs.get("complete"):
                log.warning(
                    "cell %s episode %s is complete; not marking it truncated (%s)",
                    ref.cell_id,
                    ref.episode_id,
                    reason,
                )
                return
            self._forget(ref)
            group.update_attributes(
                {"truncated": True, "truncated_reason": reason, "truncated_at": time.time()}
            )
            log.warning(
                "cell %s episode %s marked truncated at %s steps: %s",
                ref.cell_id,
                ref.episode_id,
                group.attrs.get("n_steps"),
                reason,
            )

    def _episode_lock(self, ref: EpisodeRef) -> _HeldLock:
        with self._guard:
            holder = self._locks.get(ref)
            if holder is None:
                holder = _EpisodeLock()
                self._locks[ref] = holder
        return _HeldLock(holder)

    def _create(self, ref: EpisodeRef, chunk: DecodedChunk) -> zarr.Group:
        """The episode's group with its initial (empty) commit record."""
        now = time.time()
        attrs = {
            "cell": ref.cell_id,
            "episode": ref.episode_id,
            "task": chunk.task,
            "policy_version": chunk.policy_version,
            "policy_versions": [chunk.policy_version],
            "cameras": {
                name: {
                    "encoding": cam.encoding,
                    "height": cam.height,
                    "width": cam.width,
                    "channels": cam.channels,
                }
                for name, cam in sorted(chunk.cameras.items())
            },
            "frame_chunk_rows": min(chunk.n_steps, MAX_FRAME_CHUNK_ROWS),
            "started_at": float(chunk.timestamp[0]),
            "ended_at": None,
            "outcome": None,
            "n_steps": 0,
            "next_seq": 0,
            "complete": False,
            "truncated": False,
            "truncated_reason": None,
            "created_at": now,
            "updated_at": now,
        }
        with self._guard:
            cell = zarr.open_group(self._zstore, path=EPISODES, mode="a").require_group(ref.cell_id)
        group = cell.create_group(ref.episode_id, attributes=attrs)
        log.info(
            "cell %s episode %s started (%s, version %s)",
            ref.cell_id,
            ref.episode_id,
            chunk.task,
            chunk.policy_version or "none",
        )
        return group

    @staticmethod
    def _check_consistent(where: str, attrs: dict[str, Any], chunk: DecodedChunk) -> None:
        """Later chunks must fit the episode the first chunk started."""
        if chunk.task != attrs["task"]:
            raise ChunkRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: task {chunk.task!r}, but the episode's task is {attrs['task']!r}",
            )
        want = attrs["cameras"]
        got = {
            name: {
                "encoding": cam.encoding,
                "height": cam.height,
                "width": cam.width,
                "channels": cam.channels,
            }
            for name, cam in chunk.cameras.items()
        }
        if got != want:
            raise ChunkRejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}: cameras {got} differ from the episode's {want}; every chunk of "
                "an episode carries the same cameras",
            )

    def _handles(
        self, ref: EpisodeRef, attrs: dict[str, Any], chunk: DecodedChunk, start: int
    ) -> _Writer:
        """The episode's cached writer, reopened when the commit on disk is not the one it
        made last (another store object wrote, or mark_truncated ran)."""
        with self._guard:
            writer = self._writers.get(ref)
            if writer is not None:
                self._writers.move_to_end(ref)
        if writer is not None and writer.seen == _fingerprint(attrs):
            return writer
        writer = self._open_writer(ref, attrs, chunk, start)
        with self._guard:
            self._writers[ref] = writer
            while len(self._writers) > MAX_OPEN_EPISODES:
                self._writers.popitem(last=False)
        return writer

    def _open_writer(
        self, ref: EpisodeRef, attrs: dict[str, Any], chunk: DecodedChunk, start: int
    ) -> _Writer:
        """Open (or create, before the first commit) every array of the episode once."""
        group = self._open(ref, mode="r+")
        if group is None:
            raise RuntimeError(f"episode group {ref.path} vanished while being written")
        capacity = _grow(0, start + chunk.n_steps)
        columns: dict[str, zarr.Array] = {}
        for name, (dtype, tail) in _COLUMNS.items():
            arr = _array(group, name)
            if arr is None:
                _require_fresh(group, name, start)
                arr = group.create_array(
                    name, shape=(capacity, *tail), chunks=(STEP_CHUNK_ROWS, *tail), dtype=dtype
                )
            columns[name] = arr
        cameras: dict[str, zarr.Array] = {}
        if chunk.cameras:
            cams = group.require_group(CAMERAS)
            rows = int(attrs["frame_chunk_rows"])
            for name, column in sorted(chunk.cameras.items()):
                with _quiet_vlen_bytes():
                    arr = _array(cams, name)
                    if arr is None:
                        _require_fresh(group, f"{CAMERAS}/{name}", start)
                        # Encoded images do not compress further; raw frames do.
                        arr = cams.create_array(
                            name,
                            shape=(capacity,),
                            chunks=(rows,),
                            dtype=VariableLengthBytes(),
                            compressors="auto" if column.encoding == "raw" else None,
                        )
                cameras[name] = arr
        return _Writer(group, columns, cameras, _fingerprint(attrs))

    def _forget(self, ref: EpisodeRef) -> None:
        with self._guard:
            self._writers.pop(ref, None)

    @staticmethod
    def _commit_attrs(attrs: dict[str, Any], chunk: DecodedChunk, end: int) -> dict[str, Any]:
        commit: dict[str, Any] = {
            "n_steps": end,
            "next_seq": chunk.seq + 1,
            "intervention_steps": int(attrs.get("intervention_steps", 0))
            + int(np.count_nonzero(chunk.intervention)),
            "updated_at": time.time(),
            "truncated": False,
            "truncated_reason": None,
        }
        versions = list(attrs.get("policy_versions", []))
        if chunk.policy_version not in versions:
            commit["policy_versions"] = [*versions, chunk.policy_version]
        if chunk.last and chunk.outcome is not None:
            commit.update(
                complete=True,
                outcome=dict(chunk.outcome),
                started_at=chunk.outcome["started_at"],
                ended_at=chunk.outcome["ended_at"],
            )
        return commit

    # ------------------------------------------------------------------ reading

    def episodes(self, *, complete_only: bool = True) -> list[EpisodeRef]:
        """Episodes on disk now, sorted by (cell_id, episode_id); sees other writers' work."""
        out = []
        for ref in self._listed():
            if not complete_only or self._complete_steps(ref) is not None:
                out.append(ref)
        return out

    def totals(self) -> tuple[int, int]:
        """(steps stored across all episodes, episodes including incomplete ones)."""
        steps = episodes = 0
        for ref in self._listed():
            done = self._complete_steps(ref)
            if done is not None:
                steps += done
            else:
                attrs = self._attrs(ref)
                if attrs is None:
                    continue
                steps += int(attrs.get("n_steps", 0))
            episodes += 1
        return steps, episodes

    def read_episode(self, ref: EpisodeRef, *, frames: bool = True) -> EpisodeData:
        """The committed rows of one episode; `frames=False` skips the camera arrays."""
        group = self._open(ref, mode="r")
        if group is None:
            raise KeyError(f"no episode {ref.cell_id}/{ref.episode_id} in {self.root}")
        attrs = group.attrs.asdict()
        n = int(attrs.get("n_steps", 0))
        columns: dict[str, np.ndarray] = {}
        for name, (dtype, tail) in _COLUMNS.items():
            arr = _array(group, name) if n else None
            columns[name] = np.asarray(arr[:n]) if arr is not None else np.zeros((0, *tail), dtype)
        camera_frames: dict[str, list[bytes]] = {}
        for name in attrs.get("cameras", {}) if frames else ():
            arr = _array(group, f"{CAMERAS}/{name}") if n else None
            camera_frames[name] = [bytes(f) for f in arr[:n]] if arr is not None else []
        return EpisodeData(ref=ref, attrs=attrs, frames=camera_frames, **columns)

    def _listed(self) -> list[EpisodeRef]:
        """Episode directories with group metadata, straight from the file system."""
        base = self.root / EPISODES
        refs = []
        for cell_dir in _subdirs(base):
            for ep_dir in _subdirs(cell_dir):
                if (ep_dir / "zarr.json").is_file():
                    refs.append(EpisodeRef(cell_dir.name, ep_dir.name))
        refs.sort()
        return refs

    def _complete_steps(self, ref: EpisodeRef) -> int | None:
        """n_steps if the episode is complete, else None (complete ones are cached)."""
        with self._guard:
            cached = self._complete.get(ref)
        if cached is not None:
            return cached
        attrs = self._attrs(ref)
        if attrs is None or not attrs.get("complete"):
            return None
        n = int(attrs.get("n_steps", 0))
        with self._guard:
            self._complete[ref] = n
        return n

    def _attrs(self, ref: EpisodeRef) -> dict[str, Any] | None:
        """The group's attributes read straight from its zarr.json: one small file read, no
        hop to zarr's event loop (the file is replaced atomically, so never seen torn)."""
        try:
            meta = json.loads((self.root / ref.path / "zarr.json").read_bytes())
        except FileNotFoundError:
            return None
        attrs = meta.get("attributes", {})
        return dict(attrs) if isinstance(attrs, dict) else {}

    def _open(self, ref: EpisodeRef, *, mode: str) -> zarr.Group | None:
        try:
            return zarr.open_group(
                self._zstore,
                path=ref.path,
                mode=mode,
                zarr_format=3,  # type: ignore[arg-type]
            )
        except FileNotFoundError:
            return None


class _Writer:
    """Open handles of one episode's arrays, kept between appends so that an append is one
    hop to zarr's event loop: all arrays' rows written concurrently, then the commit.

    Arrays are allocated ahead in geometric steps (`_grow`), so most appends rewrite no array
    metadata; the logical length is the group's n_steps, and readers never look past it."""

    __slots__ = ("cameras", "columns", "group", "seen")

    def __init__(
        self,
        group: zarr.Group,
        columns: dict[str, zarr.Array],
        cameras: dict[str, zarr.Array],
        seen: tuple[Any, ...],
    ) -> None:
        self.group = group
        self.columns = columns
        self.cameras = cameras
        self.seen = seen  # _fingerprint of the commit this writer made (or found) last

    def write(self, chunk: DecodedChunk, start: int, end: int, commit: dict[str, Any]) -> None:
        items: list[tuple[zarr.Array, np.ndarray]] = [
            (arr, np.asarray(getattr(chunk, name))) for name, arr in self.columns.items()
        ]
        for name, arr in self.cameras.items():
            frames = np.empty(chunk.n_steps, dtype=object)
            frames[:] = chunk.cameras[name].frames
            items.append((arr, frames))
        run = _write_all(items, start, end)
        if any(arr.shape[0] < end for arr in self.cameras.values()):
            with _quiet_vlen_bytes():  # growing a frame array rewrites its metadata
                sync(run)
        else:
            sync(run)
        # The commit point, strictly after every row write finished.
        self.group.update_attributes(commit)


async def _write_all(items: list[tuple[zarr.Array, np.ndarray]], start: int, end: int) -> None:
    await asyncio.gather(*(_write_rows(arr.async_array, v, start, end) for arr, v in items))


async def _write_rows(arr: Any, values: np.ndarray, start: int, end: int) -> None:
    if arr.shape[0] < end:
        await arr.resize((_grow(int(arr.shape[0]), end), *arr.shape[1:]))
    await arr.setitem(slice(start, end), values)


def _grow(capacity: int, end: int) -> int:
    """Allocated rows for `end` stored rows: at least doubling, so resizes are rare."""
    if capacity >= end:
        return capacity
    return max(end, 2 * capacity, MIN_CAPACITY_ROWS)


def _fingerprint(attrs: dict[str, Any]) -> tuple[Any, ...]:
    """What tells one commit from another: every commit moves next_seq or updated_at."""
    return (
        attrs.get("n_steps"),
        attrs.get("next_seq"),
        attrs.get("updated_at"),
        attrs.get("truncated"),
        attrs.get("complete"),
    )


class _HeldLock:
    """Context manager over an episode's lock that keeps the lock object alive while held."""

    __slots__ = ("holder",)

    def __init__(self, holder: _EpisodeLock) -> None:
        self.holder = holder

    def __enter__(self) -> None:
        self.holder.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.holder.lock.release()


def _array(group: zarr.Group, name: str) -> zarr.Array | None:
    """The named array, looked up directly: listing a group would also meet the temporary
    files of a concurrent metadata write."""
    try:
        node = group[name]
    except KeyError:
        return None
    if not isinstance(node, zarr.Array):
        raise RuntimeError(f"{group.path}/{name} is a {type(node).__name__}, expected an array")
    return node


def _require_fresh(group: zarr.Group, name: str, start: int) -> None:
    """A missing array is only normal before the first commit (a crash during creation)."""
    if start:
        raise RuntimeError(
            f"episode group {group.path} holds {start} steps but has no array {name!r}; "
            "the store is damaged"
        )


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and is_safe_id(p.name)]
    except FileNotFoundError:
        return []


def _ids(ref: EpisodeRef) -> tuple[str, str]:
    return ref.cell_id, ref.episode_id

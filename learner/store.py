"""The episode store: zarr v3, one group per episode at episodes/<cell_id>/<episode_id>/.

Each group holds arrays along time (timestamp, joint_pos, action, intervention, reward) and a
`cameras` subgroup with one array of encoded frames per camera. The group's attributes are
the commit record: `n_steps` and `next_seq` move only after a whole chunk's rows are written,
and readers trust rows below `n_steps` only (arrays are allocated ahead, so their shape
is a capacity, not a length). Committed bytes are never rewritten in place: a file that
holds committed rows is replaced atomically (written to a temporary file, then renamed over
the old one: every zarr.json, a frame chunk that was partly filled), or an uncompressed
per-step chunk file gets only the new rows' bytes written into it, past the committed ones.
A chunk file whose rows all lie past the commit (a fresh frame chunk) is written directly:
no reader looks at it yet. So a crash between the data and the commit leaves the old commit
and intact rows, and the actor's resend rewrites the same rows.

"Durable" means on disk: append returns only after the chunk's files and the directory
entries naming them are fsynced, the rows strictly before the commit record, through a
group commit that many appends (many streams, many cells) share (learner/group_commit.py).
A resent chunk acked as a duplicate has its episode flushed again before the ack, since the
first append may have died between its commit and its flush.

The append hot path writes chunk files itself, encoded exactly as zarr encodes them (the
`bytes`/`vlen-bytes` codecs, optionally zstd), because zarr's per-array async write
machinery costs several milliseconds per append; that writer, and every use of zarr's
private modules, lives in learner/zarr_direct.py (why, with the figures, is there). Frame
arrays are chunked along time at the uploaded chunk's step count, so an append of that
size writes fresh frame files and never reads one back. Anything the direct writer does
not know (another codec, a layout made by other code) goes through zarr itself. The result
is a plain zarr v3 store either way.

Idempotency is by (cell_id, episode_id, seq): a seq below `next_seq` was stored before and is
acked as a duplicate; a seq above it is a gap the actor must fill first.

One process writes a given episode (ingest); any number of processes may read. Within the
writing process a lock per episode lets several streams write different episodes at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import zarr
from zarr.storage import LocalStore

from fleet.common.ids import is_safe_id
from fleet.control.interventions import count_takeovers
from learner import zarr_direct
from learner.chunks import ChunkRejected, DecodedChunk
from learner.group_commit import GroupCommit, Touched
from protos.joint_layout import JOINT_DIM

log = logging.getLogger(__name__)

EPISODES = "episodes"
CAMERAS = "cameras"
# Rows per zarr chunk of the small per-step columns: an episode usually fits one file, and
# an append writes its rows into that (uncompressed) file in place.
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


@dataclass(frozen=True)
class AppendResult:
    duplicate: bool
    episode_complete: bool
    steps_written: int
    # The episode as committed after this append: what an end-of-episode callback needs,
    # without reading the episode back from the store on the ack path.
    episode_steps: int = 0
    intervention_steps: int = 0
    takeovers: int = 0  # contiguous runs of intervention steps (fleet/control/interventions.py)


@dataclass(frozen=True)
class EpisodeSummary:
    """A finished episode's counts, as its last append committed them."""

    steps: int
    intervention_steps: int
    takeovers: int = 0


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

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
        self.root = Path(root)
        # Appends are fsynced (group commit) before they return; fsync=False only for
        # measuring what that costs (tests/bench/ingest.py).
        self.group_commit = GroupCommit() if fsync else None
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
        with self._episode_lock(ref), zarr_direct.collecting() as touched:
            meta = self._group_meta(ref)
            if meta is None:
                if chunk.seq != 0:
                    raise ChunkRejected(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"{where}: the learner has no such episode, expected seq 0 first",
                    )
                self._forget(ref)
                self._create(ref, chunk)
                meta = self._group_meta(ref)
                assert meta is not None
            attrs = _attributes(meta)
            next_seq, n_stored = int(attrs["next_seq"]), int(attrs["n_steps"])
            if chunk.seq < next_seq:
                self._flush_episode(ref)
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
                handles.write(chunk, n_stored, end, meta, commit, touched, self.group_commit)
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
                False,
                chunk.last,
                chunk.n_steps,
                end,
                int(commit["intervention_steps"]),
                int(commit["takeovers"]),
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

    def quarantine(self, ref: EpisodeRef, reason: str) -> None:
        """Mark an episode the trainer cannot read, so no sampler uses it again.

        The rows stay as they are (a person may want to look at them); only the group's
        attributes gain `quarantined`, its reason and time, in one atomic commit.
        """
        with self._episode_lock(ref):
            meta = self._group_meta(ref)
            if meta is None:
                raise KeyError(f"no episode {ref.cell_id}/{ref.episode_id} in {self.root}")
            self._forget(ref)
            attrs = {
                **_attributes(meta),
                "quarantined": True,
                "quarantine_reason": reason[:1000],
                "quarantined_at": time.time(),
            }
            zarr_direct.put_json(self.root / ref.path / "zarr.json", {**meta, "attributes": attrs})
        log.error("cell %s episode %s quarantined: %s", ref.cell_id, ref.episode_id, reason)

    def quarantined(self) -> dict[EpisodeRef, str]:
        """Quarantined episodes and why, read from the store."""
        out = {}
        for ref in self._listed():
            attrs = self._attrs(ref) or {}
            if attrs.get("quarantined"):
                out[ref] = str(attrs.get("quarantine_reason", ""))
        return out

    def _flush_episode(self, ref: EpisodeRef) -> None:
        """fsync every file and directory of one episode (before acking a duplicate)."""
        if self.group_commit is None:
            return
        ep_dir = self.root / ref.path
        paths = {p for p in ep_dir.rglob("*") if not p.name.endswith(".partial")}
        self.group_commit.sync(Touched(files=paths, named=paths | {ep_dir}))

    def remove_temp_files(self, ref: EpisodeRef) -> int:
        """Delete the `*.partial` files a killed write left in an episode; how many.

        Only safe once no writer can be mid-write in it: the episode is complete, or has
        been idle far longer than one append takes (the truncation sweeper calls it then).
        """
        removed = 0
        with self._episode_lock(ref):
            for path in (self.root / ref.path).rglob("*.partial"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        if removed:
            log.info(
                "cell %s episode %s: removed %d temporary file(s) a killed write left",
                ref.cell_id,
                ref.episode_id,
                removed,
            )
        return removed

    def _episode_lock(self, ref: EpisodeRef) -> _HeldLock:
        with self._guard:
            holder = self._locks.get(ref)
            if holder is None:
                holder = _EpisodeLock()
                self._locks[ref] = holder
        return _HeldLock(holder)

    def _create(self, ref: EpisodeRef, chunk: DecodedChunk) -> None:
        """The episode's group with its initial (empty) commit record (zarr's own group
        metadata, written directly: zarr's create calls cost tens of milliseconds)."""
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
        cell_meta = self.root / EPISODES / ref.cell_id / "zarr.json"
        if not cell_meta.is_file():
            zarr_direct.put_json(cell_meta, zarr_direct.group_template())
        zarr_direct.put_json(
            self.root / ref.path / "zarr.json",
            {**zarr_direct.group_template(), "attributes": attrs},
        )
        log.info(
            "cell %s episode %s started (%s, version %s)",
            ref.cell_id,
            ref.episode_id,
            chunk.task,
            chunk.policy_version or "none",
        )

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
        ep_dir = self.root / ref.path
        if not (ep_dir / "zarr.json").is_file():
            raise RuntimeError(f"episode group {ref.path} vanished while being written")
        capacity = _grow(0, start + chunk.n_steps)
        specs = [
            (name, dtype, tail, STEP_CHUNK_ROWS, False) for name, (dtype, tail) in _COLUMNS.items()
        ]
        if chunk.cameras:
            if not (ep_dir / CAMERAS / "zarr.json").is_file():
                zarr_direct.put_json(ep_dir / CAMERAS / "zarr.json", zarr_direct.group_template())
            rows = int(attrs["frame_chunk_rows"])
            # Encoded images do not compress further; raw frames do.
            specs.extend(
                (f"{CAMERAS}/{name}", zarr_direct.VLEN, (), rows, column.encoding == "raw")
                for name, column in sorted(chunk.cameras.items())
            )
        arrays: dict[str, zarr_direct.DirectArray | zarr.Array] = {}
        for key, dtype, tail, rows, compressed in specs:
            meta_path = ep_dir / key / "zarr.json"
            meta = zarr_direct.read_json(meta_path)
            if meta is None:
                _require_fresh(ref.path, key, start)
                meta = zarr_direct.array_template(dtype, tail, rows, compressed)
                meta["shape"] = [capacity, *tail]
                zarr_direct.put_json(meta_path, meta)
            direct = zarr_direct.DirectArray.of(meta, ep_dir / key)
            arrays[key] = direct if direct is not None else self._zarr_array(ref, key)
        return _Writer(arrays, ep_dir, _fingerprint(attrs))

    def _zarr_array(self, ref: EpisodeRef, key: str) -> zarr.Array:
        """An array the direct writer does not handle, written through zarr."""
        with zarr_direct.quiet_vlen_bytes():
            return zarr.open_array(self._zstore, path=f"{ref.path}/{key}", mode="r+")

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
            # A takeover spanning chunks counts once: the last flag carries over.
            "takeovers": int(attrs.get("takeovers", 0))
            + count_takeovers(chunk.intervention, previous=bool(attrs.get("intervention_last"))),
            "intervention_last": (
                bool(chunk.intervention[-1])
                if chunk.n_steps
                else bool(attrs.get("intervention_last"))
            ),
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

    def attributes(self, ref: EpisodeRef) -> dict[str, Any] | None:
        """An episode's attributes only (task, versions, outcome, times), no arrays read."""
        return self._attrs(ref)

    def remove_episode(self, ref: EpisodeRef) -> int:
        """Delete a finished episode's group from disk (retention, `fleet store gc`);
        returns the bytes freed. An episode still being written is refused."""
        with self._episode_lock(ref):
            attrs = self._attrs(ref)
            if attrs is None:
                raise KeyError(f"no episode {ref.cell_id}/{ref.episode_id} in {self.root}")
            if not (attrs.get("complete") or attrs.get("truncated")):
                raise ValueError(f"episode {ref.cell_id}/{ref.episode_id} is still being written")
            ep_dir = self.root / ref.path
            freed = sum(f.stat().st_size for f in ep_dir.rglob("*") if f.is_file())
            self._forget(ref)
            with self._guard:
                self._complete.pop(ref, None)
            # Its zarr.json first: a crash halfway leaves no group for readers to trip on.
            (ep_dir / "zarr.json").unlink()
            shutil.rmtree(ep_dir)
        return freed

    def read_episode(self, ref: EpisodeRef, *, frames: bool = True) -> EpisodeData:
        """The committed rows of one episode; `frames=False` skips the camera arrays."""
        group = self._open_existing(ref)
        attrs = group.attrs.asdict()
        n = int(attrs.get("n_steps", 0))
        columns: dict[str, np.ndarray] = {}
        for name, (dtype, tail) in _COLUMNS.items():
            arr = _array(group, name) if n else None
            columns[name] = np.asarray(arr[:n]) if arr is not None else np.zeros((0, *tail), dtype)
        camera_frames = _frame_rows(group, attrs, 0, n, None) if frames else {}
        return EpisodeData(ref=ref, attrs=attrs, frames=camera_frames, **columns)

    def read_frames(
        self, ref: EpisodeRef, start: int, stop: int, cameras: Sequence[str] | None = None
    ) -> dict[str, list[bytes]]:
        """Encoded frames of rows [start, stop), clipped to the committed rows, of each of
        `cameras` the episode has (default: all it has). The trainer reads the model's
        cameras a block at a time, so no episode is ever held whole, nor a camera it does
        not use (a depth stream)."""
        group = self._open_existing(ref)
        attrs = group.attrs.asdict()
        stop = min(stop, int(attrs.get("n_steps", 0)))
        return _frame_rows(group, attrs, min(max(start, 0), stop), stop, cameras)

    def _open_existing(self, ref: EpisodeRef) -> zarr.Group:
        group = self._open(ref, mode="r")
        if group is None:
            raise KeyError(f"no episode {ref.cell_id}/{ref.episode_id} in {self.root}")
        return group

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
        meta = self._group_meta(ref)
        return None if meta is None else _attributes(meta)

    def _group_meta(self, ref: EpisodeRef) -> dict[str, Any] | None:
        """The episode group's whole zarr.json document (None if there is no group)."""
        try:
            meta = json.loads((self.root / ref.path / "zarr.json").read_bytes())
        except FileNotFoundError:
            return None
        return meta if isinstance(meta, dict) else {}

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
    """Open handles of one episode's arrays, kept between appends.

    An append writes each touched chunk file directly (`zarr_direct.DirectArray`) where the array's
    layout allows, through zarr otherwise, and then moves the commit by replacing the
    group's zarr.json. Arrays are allocated ahead in geometric steps (`_grow`), so most
    appends rewrite no array metadata; the logical length is the group's n_steps, and
    readers never look past it."""

    __slots__ = ("arrays", "group_dir", "seen")

    def __init__(
        self,
        arrays: dict[str, zarr_direct.DirectArray | zarr.Array],
        group_dir: Path,
        seen: tuple[Any, ...],
    ) -> None:
        self.arrays = arrays  # by path in the group: "joint_pos", "cameras/overhead", ...
        self.group_dir = group_dir
        self.seen = seen  # _fingerprint of the commit this writer made (or found) last

    def write(
        self,
        chunk: DecodedChunk,
        start: int,
        end: int,
        meta: dict[str, Any],
        commit: dict[str, Any],
        touched: Touched,
        group_commit: GroupCommit | None,
    ) -> None:
        """Rows, then the commit; with a group commit, the rows (and every file `touched`
        lists) are fsynced before the commit is written, and the commit after it."""
        slow: list[tuple[zarr.Array, np.ndarray]] = []
        slow_dirs: list[Path] = []
        for key, arr in self.arrays.items():
            if key.startswith(f"{CAMERAS}/"):
                values: Any = chunk.cameras[key.removeprefix(f"{CAMERAS}/")].frames
            else:
                values = getattr(chunk, key)
            if isinstance(arr, zarr_direct.DirectArray):
                arr.reserve(end, _grow)
                arr.write(values, start, end)
            else:
                slow.append((arr, _as_array(values)))
                slow_dirs.append(self.group_dir / key)
        if slow:
            with zarr_direct.quiet_vlen_bytes():
                zarr_direct.write_with_zarr(slow, start, end, _grow)
            for array_dir in slow_dirs:  # zarr wrote them: which files, it does not say
                written = {p for p in array_dir.rglob("*") if not p.name.endswith(".partial")}
                touched.files |= written
                touched.named |= written | {array_dir}

        def write_commit() -> Touched:
            # The commit point, strictly after every row write finished (and was flushed).
            with zarr_direct.collecting() as done:
                zarr_direct.put_json(
                    self.group_dir / "zarr.json",
                    {**meta, "attributes": {**_attributes(meta), **commit}},
                )
            return done

        if group_commit is None:
            write_commit()
        else:
            group_commit.commit(touched, write_commit)


def _attributes(meta: dict[str, Any]) -> dict[str, Any]:
    attrs = meta.get("attributes", {})
    return dict(attrs) if isinstance(attrs, dict) else {}


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


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


def _frame_rows(
    group: zarr.Group,
    attrs: dict[str, Any],
    start: int,
    stop: int,
    cameras: Sequence[str] | None,
) -> dict[str, list[bytes]]:
    """Rows [start, stop) of each declared camera's frames (of `cameras` only, if given)."""
    frames: dict[str, list[bytes]] = {}
    for name in attrs.get("cameras", {}):
        if cameras is not None and name not in cameras:
            continue
        arr = _array(group, f"{CAMERAS}/{name}") if stop > start else None
        frames[name] = [bytes(f) for f in arr[start:stop]] if arr is not None else []
    return frames


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


def _require_fresh(path: str, name: str, start: int) -> None:
    """A missing array is only normal before the first commit (a crash during creation)."""
    if start:
        raise RuntimeError(
            f"episode group {path} holds {start} steps but has no array {name!r}; "
            "the store is damaged"
        )


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and is_safe_id(p.name)]
    except FileNotFoundError:
        return []


def _ids(ref: EpisodeRef) -> tuple[str, str]:
    return ref.cell_id, ref.episode_id

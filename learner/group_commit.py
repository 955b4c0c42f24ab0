"""Group commit: many appends, from many streams, share each round of fsyncs.

Why: an ack tells a cell it may delete a chunk from its spool, so the chunk must survive a
power cut by then: its files and the directory entries that name them fsynced. One fsync
round per chunk would cap ingest at the disk's flush rate; here whichever writer arrives
while no round runs leads the next one, for itself and everyone who queued meanwhile.

A round has two phases, because a commit record must never reach the disk before the rows
it points at: (1) flush every queued writer's data files (fdatasync: their data and size)
and the directories that gained an entry, (2) run each writer's commit (the episode's
zarr.json, renamed into place) and flush that and its directory. After a
power cut the disk then holds either the old commit or the new one with all of its rows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Touched:
    """What a writer wrote: files whose data must reach the disk, and paths (files or new
    directories) whose directory entry is new, so their directory must be flushed too."""

    files: set[Path] = field(default_factory=set)
    named: set[Path] = field(default_factory=set)

    def update(self, other: Touched) -> None:
        self.files |= other.files
        self.named |= other.named


@dataclass
class _Entry:
    data: Touched
    then: Callable[[], Touched]
    done: bool = False
    error: BaseException | None = None


@dataclass
class GroupStats:
    """Counters since start: rounds run, commits in them, paths flushed, seconds flushing."""

    rounds: int = 0
    commits: int = 0
    fsyncs: int = 0
    flush_s: float = 0.0
    largest_round: int = 0


class GroupCommit:
    """Durable commits shared between threads (see the module docstring).

    The flushes of one phase run in parallel threads: the file system then folds their
    journal commits into one, and the disk's cache flushes overlap.
    """

    def __init__(self, flush_threads: int = 8) -> None:
        self._cond = threading.Condition()
        self._queue: list[_Entry] = []
        self._busy = False
        self._pool = ThreadPoolExecutor(flush_threads, thread_name_prefix="fsync")
        self.stats = GroupStats()

    def commit(self, data: Touched, then: Callable[[], Touched]) -> None:
        """Return once `data` is on disk, `then()` has run after it, and what `then`
        wrote is on disk too. Raises what `then` raised, or the flush's OSError."""
        entry = _Entry(data, then)
        with self._cond:
            self._queue.append(entry)
            while not entry.done:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    self._round(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if entry.error is not None:
            raise entry.error

    def sync(self, data: Touched) -> None:
        """Only a flush: return once `data` is on disk."""
        self.commit(data, Touched)

    def _round(self, batch: list[_Entry]) -> None:
        t0 = time.perf_counter()
        try:
            first = Touched()
            for e in batch:
                first.update(e.data)
            self._flush(first)
            written = Touched()
            for e in batch:
                try:
                    written.update(e.then())
                except BaseException as exc:  # this writer's commit failed; the others stand
                    e.error = exc
            self._flush(written)
        except OSError as exc:
            log.critical("fsync failed, %d chunk(s) not acked: %s", len(batch), exc)
            for e in batch:
                e.error = e.error or exc
        finally:
            for e in batch:
                e.done = True
            s = self.stats
            s.rounds += 1
            s.commits += len(batch)
            s.largest_round = max(s.largest_round, len(batch))
            s.flush_s += time.perf_counter() - t0

    def _flush(self, data: Touched) -> None:
        """fdatasync each file, fsync the directory of each new name, all in parallel."""
        dirs = {p.parent for p in data.named}
        jobs = [(p, False) for p in data.files - dirs] + [(d, True) for d in dirs]
        if not jobs:
            return
        if len(jobs) == 1:
            fsync_path(*jobs[0])
        else:
            for _ in self._pool.map(lambda job: fsync_path(*job), jobs):
                pass
        self.stats.fsyncs += len(jobs)


def fsync_path(path: Path, metadata: bool = True) -> None:
    """Flush one file's data (and with `metadata` its inode), or one directory's entries,
    to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # replaced since (its successor is flushed by its own writer) or removed
    try:
        (os.fsync if metadata else os.fdatasync)(fd)
    finally:
        os.close(fd)

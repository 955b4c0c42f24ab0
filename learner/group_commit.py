"""Group commit: many appends, from many streams, share each round of fsyncs.

Why: an ack tells a cell it may delete a chunk from its spool, so the chunk must survive a
power cut by then: its files and the directory entries that name them fsynced. One fsync
round per chunk would cap ingest at the disk's flush rate; here whichever writer arrives
while no round runs leads the next one, for itself and everyone who queued meanwhile.

A round has two phases, because a commit record must never reach the disk before the rows
it points at: (1) fsync every queued writer's data files and their directories, (2) run
each writer's commit (the episode's zarr.json, renamed into place) and fsync those. After a
power cut the disk then holds either the old commit or the new one with all of its rows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    data: Collection[Path]
    then: Callable[[], Collection[Path]]
    done: bool = False
    error: BaseException | None = None


@dataclass
class GroupStats:
    """Counters since start: rounds run, commits in them, paths fsynced, seconds flushing."""

    rounds: int = 0
    commits: int = 0
    fsyncs: int = 0
    flush_s: float = 0.0
    largest_round: int = 0


class GroupCommit:
    """Durable commits shared between threads (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[_Entry] = []
        self._busy = False
        self.stats = GroupStats()

    def commit(self, data: Collection[Path], then: Callable[[], Collection[Path]]) -> None:
        """Return once `data` is on disk, `then()` has run after it, and the paths `then`
        returns are on disk too. Raises what `then` raised, or the flush's OSError."""
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

    def sync(self, paths: Collection[Path]) -> None:
        """Only a flush: return once `paths` (and their directories) are on disk."""
        self.commit(paths, lambda: ())

    def _round(self, batch: list[_Entry]) -> None:
        t0 = time.perf_counter()
        try:
            self._flush({p for e in batch for p in e.data})
            written: set[Path] = set()
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

    def _flush(self, paths: set[Path]) -> None:
        """fsync each path (file or directory), then each one's directory."""
        if not paths:
            return
        dirs = {p.parent for p in paths} - paths
        for path in (*paths, *dirs):
            fsync_path(path)
        self.stats.fsyncs += len(paths) + len(dirs)


def fsync_path(path: Path) -> None:
    """Flush one file's data, or one directory's entries, to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # replaced since (its successor is flushed by its own writer) or removed
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Acked means on disk: an append returns (and ingest acks) only after every file it wrote
and every directory entry naming them is fsynced, the rows before the commit record; many
appends share each round of fsyncs (group commit); a failed fsync is never acked."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from learner.ingest import IngestServicer
from learner.store import EpisodeRef, EpisodeStore
from tests.test_store import chunk, make_msg


class FsyncLog:
    """Every fsync and fdatasync this process makes: (real path, time), in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, delay_s: float = 0.0) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail: str | None = None
        lock = threading.Lock()

        def logged(real: Callable[[int], None]) -> Callable[[int], None]:
            def flush(fd: int) -> None:
                path = os.readlink(f"/proc/self/fd/{fd}")
                if self.fail is not None and self.fail in path:
                    raise OSError(errno.EIO, "simulated disk error", path)
                if delay_s:
                    time.sleep(delay_s)
                real(fd)
                with lock:
                    self.calls.append((path, time.time_ns()))

            return flush

        monkeypatch.setattr(os, "fsync", logged(os.fsync))
        monkeypatch.setattr(os, "fdatasync", logged(os.fdatasync))

    def last(self, path: Path) -> int | None:
        times = [t for p, t in self.calls if p == str(path.resolve())]
        return max(times) if times else None

    def order(self, path: Path) -> int:
        return max(i for i, (p, _) in enumerate(self.calls) if p == str(path.resolve()))


def test_append_returns_only_once_its_files_and_directories_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FsyncLog(monkeypatch)
    store = EpisodeStore(tmp_path / "store")
    for seq in range(3):
        store.append(chunk(seq, last=seq == 2))
        ep_dir = tmp_path / "store" / "episodes" / "c1" / "e1"
        files = [p for p in ep_dir.rglob("*") if p.is_file()]
        assert files and not [p for p in files if p.name.endswith(".partial")]
        for path in files:
            synced = log.last(path)
            assert synced is not None, f"{path} was never fsynced (chunk {seq})"
            assert synced >= path.stat().st_mtime_ns, f"{path} written after its fsync"
        # Every directory on the way down holds an fsynced entry for the next one.
        for directory in {p.parent for p in files} | {ep_dir, ep_dir.parent, ep_dir.parent.parent}:
            assert log.last(directory) is not None, f"directory {directory} not fsynced"
        # The commit record reaches the disk after the rows it points at.
        commit = log.order(ep_dir / "zarr.json")
        for column in ("joint_pos", "action", "cameras/overhead"):
            for row_file in (ep_dir / column / "c").rglob("*"):
                if row_file.is_file():
                    assert log.order(row_file) < commit, f"{row_file} synced after the commit"


def test_concurrent_appends_share_fsync_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FsyncLog(monkeypatch, delay_s=0.005)  # a disk that takes a while to flush
    store = EpisodeStore(tmp_path / "store")
    writers, chunks = 12, 6
    errors: list[BaseException] = []

    def cell(i: int) -> None:
        try:
            for seq in range(chunks):
                store.append(chunk(seq, cell=f"c{i}", episode="e1", last=seq == chunks - 1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=cell, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    stats = store.group_commit.stats if store.group_commit else None
    assert stats is not None and stats.commits == writers * chunks
    # One writer's round carries the others that queued meanwhile.
    assert stats.rounds <= stats.commits / 2, stats
    assert stats.largest_round >= 3, stats
    for i in range(writers):
        data = store.read_episode(EpisodeRef(f"c{i}", "e1"))
        assert data.attrs["complete"] and len(data.timestamp) == chunks * len(chunk(0).timestamp)


def test_a_failed_fsync_is_not_acked_and_the_resend_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = FsyncLog(monkeypatch)
    store = EpisodeStore(tmp_path / "store")
    servicer = IngestServicer(store, known_tasks=None)
    assert servicer._handle(make_msg(0), "peer").durable
    log.fail = "joint_pos"  # the disk fails under the next chunk's rows
    ack = servicer._handle(make_msg(1), "peer")
    assert not ack.durable and ack.code == grpc.StatusCode.INTERNAL.value[0]
    assert "resend" in ack.message
    # The commit never moved: the resend is stored, not taken for a duplicate.
    assert store.read_episode(EpisodeRef("c1", "e1")).attrs["next_seq"] == 1
    log.fail = None
    again = servicer._handle(make_msg(1), "peer")
    assert again.durable and not again.duplicate
    assert store.read_episode(EpisodeRef("c1", "e1")).attrs["next_seq"] == 2


def test_a_duplicate_is_flushed_again_before_its_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A learner that died between a commit and its flush left the chunk in page cache only;
    # the resend after the restart is a duplicate and must not be acked before it is on disk.
    EpisodeStore(tmp_path / "store", fsync=False).append(chunk(0))
    log = FsyncLog(monkeypatch)
    store = EpisodeStore(tmp_path / "store")
    assert store.append(chunk(0)).duplicate
    ep_dir = tmp_path / "store" / "episodes" / "c1" / "e1"
    for path in ep_dir.rglob("*"):
        assert log.last(path) is not None, f"{path} acked as a duplicate without an fsync"

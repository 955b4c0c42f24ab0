"""The cell's durable spool: what is written survives SIGKILL at any moment, what is acked
leaves the disk, a full spool refuses whole episode tails loudly, and an actor restart
resends every unacked chunk in order."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from actors.spool import HEADER_BYTES, ChunkSpool
from actors.uplink import Uplink
from fleet.common.net import free_port
from fleet.common.wire import to_tensor
from protos.fleetlearn.v1 import trajectory_pb2, trajectory_pb2_grpc
from tests.waiting import wait_until

CELL = "cell-07"


def make_chunk(episode: str, seq: int, steps: int = 5, last: bool = False):
    chunk = trajectory_pb2.StepChunk(
        cell_id=CELL,
        episode_id=episode,
        seq=seq,
        first_step=seq * steps,
        task="pick_cube",
        timestamp=to_tensor(np.arange(steps, dtype=np.float64) + seq * steps),
        joint_pos=to_tensor(np.full((steps, 14), seq, np.float32)),
        action=to_tensor(np.zeros((steps, 14), np.float32)),
        intervention=to_tensor(np.zeros(steps, np.bool_)),
        reward=to_tensor(np.zeros(steps, np.float32)),
        last=last,
    )
    if last:
        chunk.outcome.reason = "timeout"
    return chunk


class Recorder(trajectory_pb2_grpc.TrajectoryServiceServicer):
    """Acks everything, remembers arrival order of first receipts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.order: list[tuple[str, int]] = []

    def Upload(self, request_iterator, context) -> Iterator[trajectory_pb2.ChunkAck]:
        for msg in request_iterator:
            key = (msg.episode_id, msg.seq)
            with self.lock:
                duplicate = key in self.order
                if not duplicate:
                    self.order.append(key)
            yield trajectory_pb2.ChunkAck(
                cell_id=msg.cell_id,
                episode_id=msg.episode_id,
                seq=msg.seq,
                durable=True,
                duplicate=duplicate,
            )


def serve(port: int, servicer: Recorder) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trajectory_pb2_grpc.add_TrajectoryServiceServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


# -- the spool alone ----------------------------------------------------------------------


def test_write_recover_in_order_and_delete(tmp_path: Path) -> None:
    spool = ChunkSpool(tmp_path, quota_bytes=1 << 20)
    chunks = [make_chunk("ep0", s) for s in range(5)]
    for n, chunk in enumerate(chunks):
        spool.write(n, chunk.SerializeToString())
    assert spool.chunks == 5
    assert spool.used_bytes == sum(c.ByteSize() + HEADER_BYTES for c in chunks)
    spool.delete(1)
    spool.delete(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n:016d}.chunk" for n in (0, 2, 4)]
    again = ChunkSpool(tmp_path, quota_bytes=1 << 20)
    recovered = again.recover()
    assert [r.n for r, _ in recovered] == [0, 2, 4]
    assert [c for _, c in recovered] == [chunks[0], chunks[2], chunks[4]]
    assert again.next_number() == 5
    assert again.used_bytes == spool.used_bytes


def test_corrupt_file_is_quarantined_not_sent(tmp_path: Path) -> None:
    spool = ChunkSpool(tmp_path, quota_bytes=1 << 20)
    for n in range(3):
        spool.write(n, make_chunk("ep0", n).SerializeToString())
    path = spool.path_of(1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    again = ChunkSpool(tmp_path, quota_bytes=1 << 20)
    assert [r.n for r, _ in again.recover()] == [0, 2]
    assert again.corrupt == 1
    assert (tmp_path / "corrupt" / path.name).exists()


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from actors.spool import ChunkSpool
    from fleet.common.wire import to_tensor
    from protos.fleetlearn.v1 import trajectory_pb2

    spool = ChunkSpool(sys.argv[1], quota_bytes=1 << 40)
    spool.recover()
    n = spool.next_number()
    rng = np.random.default_rng(n)
    while True:
        steps = int(rng.integers(1, 40))
        chunk = trajectory_pb2.StepChunk(
            cell_id="cell-07", episode_id="ep", seq=n, first_step=0, task="pick_cube",
            joint_pos=to_tensor(rng.standard_normal((steps, 14)).astype(np.float32)),
        )
        chunk.cameras.add(camera="c", encoding="jpeg", frames=[rng.bytes(20000)] * steps)
        spool.write(n, chunk.SerializeToString())
        print(n, flush=True)
        n += 1
    """
)


def test_sigkill_mid_write_never_corrupts_and_keeps_every_written_chunk(tmp_path: Path) -> None:
    """A writer process is SIGKILLed at random moments, five times over: every chunk it
    reported written is there and intact, nothing torn is ever loaded."""
    rng = random.Random(4)
    reported: set[int] = set()
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # it is writing now
        assert first.strip().isdigit()
        time.sleep(rng.uniform(0.05, 0.4))
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        reported |= {int(x) for x in (first + out).split()}
        spool = ChunkSpool(tmp_path, quota_bytes=1 << 40)
        recovered = spool.recover()
        numbers = [r.n for r, _ in recovered]
        assert spool.corrupt == 0
        assert numbers == list(range(len(numbers)))  # contiguous, in order
        assert reported <= set(numbers)  # every chunk reported written survived
        assert all(c.seq == r.n for r, c in recovered)
        assert not list(tmp_path.glob(".*.tmp"))
    assert len(reported) >= 5


# -- the uplink with a spool ------------------------------------------------------------


def test_actor_restart_resends_spooled_chunks_in_order(tmp_path: Path) -> None:
    """Chunks recorded while the learner is down survive an actor restart and reach the
    learner in order once it is up; acked chunks leave the disk. Only a few are kept in
    memory (max_queue=2): the rest are read back from the spool."""
    port = free_port()
    first = Uplink(
        f"127.0.0.1:{port}",
        deadline_s=2.0,
        max_queue=2,
        cell_id=CELL,
        spool=ChunkSpool(tmp_path, 1 << 20),
    )
    first.start()
    submitted = [make_chunk("ep0", s, last=s == 5) for s in range(6)]
    submitted += [make_chunk("ep1", s) for s in range(3)]
    for k, chunk in enumerate(submitted, start=1):
        assert first.submit(chunk)
        # One at a time, so the writer's backlog (max_queue=2) never refuses one.
        assert wait_until(lambda k=k: first.stats["spool_chunks"] == k)
    first.stop()  # the actor goes away with nothing acked
    assert len(list(tmp_path.glob("*.chunk"))) == 9

    servicer = Recorder()
    server = serve(port, servicer)
    second = Uplink(
        f"127.0.0.1:{port}",
        deadline_s=2.0,
        max_queue=2,
        cell_id=CELL,
        spool=ChunkSpool(tmp_path, 1 << 20),
    )
    try:
        assert second.stats["recovered"] == 9
        second.start()
        assert second.submit(make_chunk("ep1", 3, last=True))
        assert second.flush(10.0)
        assert wait_until(lambda: not list(tmp_path.glob("*.chunk")))
    finally:
        second.stop()
        server.stop(0)
    assert servicer.order == [("ep0", s) for s in range(6)] + [("ep1", s) for s in range(4)]
    assert second.stats["spool_bytes"] == second.stats["spool_chunks"] == 0


def test_full_spool_refuses_the_episode_tail_loudly_and_never_blocks(tmp_path: Path) -> None:
    """Policy: what is spooled is kept; once a chunk of an episode is refused, the rest of
    that episode is refused too (no holes); a later episode is taken again once acks free
    room. Every refusal is counted, and the operator gets a spool_full fault."""
    size = make_chunk("ep0", 0).ByteSize() + HEADER_BYTES
    port = free_port()
    faults: list[str] = []
    deadline_s = 10.0
    up = Uplink(
        f"127.0.0.1:{port}",
        deadline_s=deadline_s,
        max_queue=64,
        cell_id=CELL,
        spool=ChunkSpool(tmp_path, quota_bytes=4 * size + size // 2),
        on_fault=faults.append,
    )
    up.start()
    server = None
    try:
        t0 = time.monotonic()
        accepted = [up.submit(make_chunk("ep0", s)) for s in range(6)]
        accepted.append(up.submit(make_chunk("ep0", 6, last=True)))
        # The control loop never waits on the learner (unreachable here): a submit that did
        # would take a call's deadline. Not a speed figure: a busy 2-core CI machine once took
        # 0.7 s for these seven.
        assert time.monotonic() - t0 < deadline_s / 2
        assert accepted == [True] * 4 + [False] * 3
        stats = up.stats
        assert stats["dropped"] == 3 and stats["dropped_steps"] == 15
        assert stats["spool_full"]
        assert len(faults) == 1 and faults[0].startswith("spool_full: cell cell-07 episode ep0")
        assert wait_until(lambda: up.stats["spool_chunks"] == 4)
        assert up.stats["spool_bytes"] <= 4 * size + size // 2

        servicer = Recorder()
        server = serve(port, servicer)
        assert up.flush(10.0)
        assert up.submit(make_chunk("ep1", 0, last=True))  # room again: a new episode
        assert up.flush(10.0)
    finally:
        up.stop()
        if server is not None:
            server.stop(0)
    assert servicer.order == [("ep0", s) for s in range(4)] + [("ep1", 0)]
    assert not up.stats["spool_full"]


def test_quota_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ChunkSpool(tmp_path, 0)


def test_a_token_spooled_by_an_older_version_is_never_sent_again(tmp_path: Path) -> None:
    spool = ChunkSpool(tmp_path / "spool", 1 << 20, fsync=False)
    old_token_field = b"\x7a\x0aold-secret"  # field 15 (length-delimited): the old token
    spool.write(0, make_chunk("ep", 0).SerializeToString() + old_token_field)
    assert b"old-secret" in spool.path_of(0).read_bytes()
    for chunk in (spool.read(0), ChunkSpool(tmp_path / "spool", 1 << 20).recover()[0][1]):
        assert chunk.episode_id == "ep"
        assert b"old-secret" not in chunk.SerializeToString()

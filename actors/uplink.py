"""Streams a cell's StepChunks to the learner and keeps every chunk until it is acked durable.

The control loop must never wait on the network or the disk, so `submit` only appends to a
bounded in-memory queue and returns. Two threads of the uplink's own do the rest:

- the writer puts each queued chunk into the cell's durable spool (actors/spool.py: fsync,
  then an atomic rename) before the chunk may go on the wire, so an actor crash or restart
  loses nothing; on start the spool's unacked chunks are reloaded and resent first, in order;
- the stream thread drives the bidirectional `TrajectoryService.Upload` stream and sends
  spooled chunks in submission order. Every chunk stays queued (and spooled) until its ack
  arrives; when the stream breaks the thread reconnects with exponential backoff and
  jitter and resends all unacked chunks in order. That is safe because the learner stores
  each (cell_id, episode_id, seq) once and acks a resend again.

A chunk is refused only when the spool's byte quota is full or the writer's backlog is
(the disk is far slower than the cell records); then every later chunk of the same episode
is refused too, so the learner never sees a hole in an episode. Refusals are counted,
logged and reported as a `spool_full` fault, never hidden. Without a spool (tests, or
`spool=None`) the queue lives in memory only and `max_queue` bounds it.

Memory stays bounded during a long outage: at most `max_queue` spooled chunks are kept in
memory, the rest are read back from the spool when their turn to be sent comes.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from actors.recorder import chunk_steps_of
from actors.spool import HEADER_BYTES, ChunkSpool
from actors.thread_priority import lower_this_thread
from protos.fleetlearn.v1 import trajectory_pb2, trajectory_pb2_grpc

log = logging.getLogger(__name__)

UPLINK_NICE = 2  # spooling and sending yield the CPU to the control loop (they catch up)
MAX_MESSAGE_BYTES = 64 << 20  # the gateway accepts this much; camera-heavy chunks need it

# Keepalive pings find a dead learner (or a silently dropped NAT entry) within seconds
# instead of at the next TCP timeout; reconnect backoff stays short (at most 2 s: a failed
# connect costs a cell next to nothing, a late one costs the drain after an outage) so a
# restarted learner is found again quickly. The gateway permits pings every 5 s without
# calls.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


def open_channel(address: str) -> grpc.Channel:
    """A channel to the learner with the fleet's keepalive and size options: TLS (mutual
    when this cell has a certificate) once actors/main.py chose it via fleet.common.tls."""
    from fleet.common.tls import client_channel

    return client_channel(address, CHANNEL_OPTIONS)


# Rejections the learner may not repeat on a resend (its store hiccuped, it is restarting).
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
    }
)
MAX_TRANSIENT_REJECTS = 5


class Backoff:
    """Exponential backoff with jitter, so a fleet of cells does not reconnect in lockstep."""

    def __init__(self, initial_s: float = 0.2, maximum_s: float = 2.0, factor: float = 2.0):
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.factor = factor
        self._current = initial_s
        self._rng = random.Random()

    def next(self) -> float:
        delay = self._rng.uniform(self._current / 2, self._current)
        self._current = min(self._current * self.factor, self.maximum_s)
        return delay

    def reset(self) -> None:
        self._current = self.initial_s


class _Stream:
    """One Upload call: its rendezvous object and whether it is over."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.call: Any = None
        self.closed = threading.Event()
        self.ack_timeout = False
        self.retry = False  # the learner asked for a resend (a transient rejection)
        self.opened_at = time.monotonic()
        self.last_ack = 0.0  # monotonic time of this stream's latest ack


@dataclass
class _Entry:
    """One queued chunk: in memory (or evicted to the spool only) until acked."""

    chunk: trajectory_pb2.StepChunk | None
    episode_id: str
    seq: int
    steps: int
    version: str
    size: int  # bytes it takes in the spool (0 without one)
    ready: bool  # may go on the wire: spooled, or there is no spool
    on_disk: bool


class Uplink:
    """Durable, ordered, at-least-once delivery of StepChunks over one reconnecting stream."""

    def __init__(
        self,
        address: str,
        *,
        deadline_s: float,
        max_queue: int,
        cell_id: str,
        stream_lifetime_s: float = 300.0,
        spool: ChunkSpool | None = None,
        on_fault: Callable[[str], None] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.address = address
        self.deadline_s = float(deadline_s)
        self.max_queue = int(max_queue)
        self.cell_id = cell_id
        self.spool = spool
        self.on_fault = on_fault
        # Every call has a deadline: the stream's is its lifetime, after which it is reopened
        # (unacked chunks are resent); a missing ack is caught sooner by the ack watchdog.
        self.stream_lifetime_s = float(stream_lifetime_s)
        self._cond = threading.Condition()
        self._pending: OrderedDict[int, _Entry] = OrderedDict()
        self._keys: dict[tuple[str, int], int] = {}
        self._ever_sent: set[int] = set()
        self._transient: dict[int, int] = {}  # transient rejections per chunk so far
        self._sent_at: dict[int, float] = {}  # on the current stream, for the ack watchdog
        self._next_n = 0  # submission number of the next submitted chunk
        self._stream_next = 0  # submission number the current stream sends next
        self._unwritten: deque[int] = deque()  # submission numbers the writer has not spooled
        # Spool bytes promised to chunks not yet written, plus those of chunks the disk
        # refused (held in memory instead): both count against the quota.
        self._reserved = 0
        self._in_memory = 0  # entries whose chunk is held in memory
        self._torn: set[str] = set()  # episodes whose tail is being refused
        self._full = False
        self._stream: _Stream | None = None
        self._stopping = threading.Event()
        self._writer_stop = threading.Event()
        self._wake = threading.Event()  # set by stop() and by the channel becoming READY
        self._thread: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._channel: grpc.Channel | None = None
        self._connected = False
        self._write_s = 0.0
        self._counts = dict.fromkeys(
            (
                "chunks_sent",
                "chunks_acked",
                "steps_acked",
                "resends",
                "dropped",
                "dropped_steps",
                "rejected",
                "transient_rejects",
                "spool_writes",
                "spool_errors",
                "recovered",
            ),
            0,
        )
        if spool is not None:
            self._recover(spool)

    def _recover(self, spool: ChunkSpool) -> None:
        """Queue the chunks an earlier run left unacked, ahead of anything new."""
        for record, chunk in spool.recover():
            keep = self._in_memory < self.max_queue
            self._pending[record.n] = _Entry(
                chunk=chunk if keep else None,
                episode_id=chunk.episode_id,
                seq=chunk.seq,
                steps=chunk_steps_of(chunk),
                version=chunk.policy_version,
                size=record.size,
                ready=True,
                on_disk=True,
            )
            self._in_memory += int(keep)
            self._keys[(chunk.episode_id, chunk.seq)] = record.n
            self._counts["recovered"] += 1
        self._next_n = spool.next_number()
        if self._pending:
            log.info(
                "cell %s: %d unacked chunks from the spool will be sent first",
                self.cell_id,
                len(self._pending),
            )

    # -- the control loop's side -------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("uplink already started")
        self._channel = open_channel(self.address)
        self._channel.subscribe(self._on_connectivity, try_to_connect=True)
        if self.spool is not None:
            self._writer = threading.Thread(
                target=self._write_loop, name=f"spool-{self.cell_id}", daemon=True
            )
            self._writer.start()
        self._thread = threading.Thread(
            target=self._run, name=f"uplink-{self.cell_id}", daemon=True
        )
        self._thread.start()
        log.info(
            "cell %s: uplink to %s started (spool %s)",
            self.cell_id,
            self.address,
            self.spool.directory if self.spool is not None else "off",
        )

    def submit(self, chunk: trajectory_pb2.StepChunk) -> bool:
        """Queue a chunk for spooling and upload without blocking; False (counted, logged,
        reported) if it is refused. See the module docstring for the policy."""
        size = chunk.ByteSize() + HEADER_BYTES if self.spool is not None else 0
        steps = chunk_steps_of(chunk)
        fault = ""
        with self._cond:
            why = self._refusal(chunk, size)
            if not why:
                n = self._next_n
                self._next_n += 1
                self._pending[n] = _Entry(
                    chunk=chunk,
                    episode_id=chunk.episode_id,
                    seq=chunk.seq,
                    steps=steps,
                    version=chunk.policy_version,
                    size=size,
                    ready=self.spool is None,
                    on_disk=False,
                )
                self._in_memory += 1
                self._keys[(chunk.episode_id, chunk.seq)] = n
                if self.spool is not None:
                    self._unwritten.append(n)
                    self._reserved += size
                if chunk.last:
                    self._torn.discard(chunk.episode_id)
                self._cond.notify_all()
                return True
            self._counts["dropped"] += 1
            self._counts["dropped_steps"] += steps
            dropped = self._counts["dropped"]
            newly_torn = chunk.episode_id not in self._torn
            if chunk.last:
                self._torn.discard(chunk.episode_id)
            elif newly_torn:
                self._torn.add(chunk.episode_id)
            if newly_torn and not self._full and not self._stopping.is_set():
                self._full = True  # one fault per full spell; every drop is still logged
                kind = "spool_full" if self.spool is not None else "uplink_full"
                fault = (
                    f"{kind}: cell {self.cell_id} episode {chunk.episode_id}: {why}; "
                    f"refusing the episode from seq {chunk.seq} on"
                )
        log.error(
            "cell %s episode %s: DROPPED chunk seq %d (%d steps, version %r): %s "
            "(%d chunks dropped so far)",
            self.cell_id,
            chunk.episode_id,
            chunk.seq,
            steps,
            chunk.policy_version,
            why,
            dropped,
        )
        if fault and self.on_fault is not None:
            self.on_fault(fault)
        return False

    def _refusal(self, chunk: trajectory_pb2.StepChunk, size: int) -> str:
        """Why `chunk` cannot be queued now, or "" (caller locks)."""
        if self._stopping.is_set():
            return "the uplink is stopped"
        if chunk.episode_id in self._torn:
            return "an earlier chunk of this episode was dropped (no holes in an episode)"
        if self.spool is None:
            if len(self._pending) >= self.max_queue:
                return f"{self.max_queue} chunks are waiting for acks"
            return ""
        if len(self._unwritten) >= self.max_queue:
            return f"{self.max_queue} chunks are waiting for the disk"
        if not self.spool.fits(self._reserved + size):
            return (
                f"the spool holds {self.spool.used_bytes + self._reserved} of its "
                f"{self.spool.quota_bytes} bytes"
            )
        if self._full:
            self._full = False
            log.warning("cell %s: the spool has room again", self.cell_id)
        return ""

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted chunk is acked (durable or rejected)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout=max(0.0, timeout_s))

    def stop(self) -> None:
        """Stop streaming; unacked chunks stay in the spool for the next start (without a
        spool they are logged as lost). Idempotent."""
        with self._cond:
            self._stopping.set()
            self._wake.set()
            stream = self._stream
            self._cond.notify_all()
        if stream is not None and stream.call is not None:
            stream.call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=self.deadline_s + 5.0)
            if self._thread.is_alive():
                log.error("cell %s: uplink thread did not stop", self.cell_id)
        with self._cond:
            self._writer_stop.set()  # after it has spooled what was submitted
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=30.0)
            if self._writer.is_alive():
                log.error("cell %s: spool writer did not stop", self.cell_id)
        if self._channel is not None:
            self._channel.unsubscribe(self._on_connectivity)
            self._channel.close()
            self._channel = None
        self._connected = False
        with self._cond:
            left = len(self._pending)
        if left and self.spool is not None:
            log.warning(
                "cell %s: uplink stopped with %d chunks unacked; they stay in %s and are "
                "sent at the next start",
                self.cell_id,
                left,
                self.spool.directory,
            )
        elif left:
            log.error("cell %s: uplink stopped with %d chunks never acked", self.cell_id, left)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def stats(self) -> dict[str, Any]:
        with self._cond:
            out: dict[str, Any] = dict(self._counts)
            out["pending"] = len(self._pending)
            out["spool_full"] = self._full
            writes = self._counts["spool_writes"]
            out["spool_write_ms"] = round(1000.0 * self._write_s / writes, 3) if writes else 0.0
            if self.spool is not None:
                out["spool_bytes"] = self.spool.used_bytes
                out["spool_chunks"] = self.spool.chunks
                out["spool_corrupt"] = self.spool.corrupt
            else:
                out["spool_bytes"] = out["spool_chunks"] = out["spool_corrupt"] = 0
        out["connected"] = self._connected
        return out

    # -- the spool writer ----------------------------------------------------------------

    def _write_loop(self) -> None:
        """Spool queued chunks in submission order; each becomes sendable once on disk."""
        lower_this_thread(UPLINK_NICE, cell_id=self.cell_id, what="the spool writer")
        spool = self.spool
        assert spool is not None
        while True:
            with self._cond:
                while not self._unwritten and not self._writer_stop.is_set():
                    self._cond.wait(timeout=0.5)
                if not self._unwritten:
                    return
                n = self._unwritten[0]
                entry = self._pending[n]
                chunk = entry.chunk
            assert chunk is not None
            t0 = time.perf_counter()
            try:
                spool.write(n, chunk.SerializeToString())
                on_disk = True
            except OSError as exc:
                # A failing disk must not stop the data: send it from memory, loudly.
                on_disk = False
                message = (
                    f"spool_error: cell {self.cell_id} episode {entry.episode_id} seq "
                    f"{entry.seq}: could not spool ({exc}); sending it from memory only"
                )
                log.error("%s", message)
                if self.on_fault is not None:
                    self.on_fault(message)
            elapsed = time.perf_counter() - t0
            with self._cond:
                self._unwritten.popleft()
                if on_disk:
                    self._reserved -= entry.size
                entry.ready = True
                entry.on_disk = on_disk
                self._write_s += elapsed
                self._counts["spool_writes" if on_disk else "spool_errors"] += 1
                # Keep the oldest max_queue chunks in memory (they are sent first); the
                # newer ones wait on disk only, so a long outage cannot exhaust memory.
                if on_disk and self._in_memory > self.max_queue:
                    entry.chunk = None
                    self._in_memory -= 1
                self._cond.notify_all()

    # -- the stream thread ---------------------------------------------------------------

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        # Acks prove the link up and stream errors prove it down; the channel's own state
        # covers the idle time in between (it is reported with some delay).
        self._connected = state is grpc.ChannelConnectivity.READY
        if self._connected:
            self._wake.set()  # the learner is back: end the backoff wait, resend now

    def _run(self) -> None:
        lower_this_thread(UPLINK_NICE, cell_id=self.cell_id, what="the uplink")
        assert self._channel is not None
        stub = trajectory_pb2_grpc.TrajectoryServiceStub(self._channel)
        backoff = Backoff()
        generation = 0
        while not self._stopping.is_set():
            generation += 1
            stream = _Stream(generation)
            with self._cond:
                self._stream = stream
                self._stream_next = next(iter(self._pending), self._next_n)
                self._sent_at.clear()
                unacked = len(self._pending)
            if generation > 1 and unacked:
                log.info(
                    "cell %s: upload stream %d opens, resending %d unacked chunks in order",
                    self.cell_id,
                    generation,
                    unacked,
                )
            clean = False
            try:
                stream.call = stub.Upload(self._requests(stream), timeout=self.stream_lifetime_s)
                for ack in stream.call:
                    self._connected = True
                    stream.last_ack = time.monotonic()
                    if self._on_ack(ack):
                        stream.retry = True
                        break
                    backoff.reset()
                if stream.retry:
                    pass  # reopen after a backoff and resend from the chunk not stored
                elif not self._stopping.is_set():
                    log.warning(
                        "cell %s: learner closed upload stream %d; reconnecting",
                        self.cell_id,
                        generation,
                    )
            except grpc.RpcError as exc:
                if self._stopping.is_set():
                    break
                code, details = exc.code(), exc.details()
                if stream.ack_timeout:
                    log.warning(
                        "cell %s: no ack within %.1f s on upload stream %d; reconnecting",
                        self.cell_id,
                        self.deadline_s,
                        generation,
                    )
                elif code is grpc.StatusCode.DEADLINE_EXCEEDED and (
                    time.monotonic() - stream.opened_at >= self.stream_lifetime_s * 0.9
                ):
                    clean = True  # the stream reached its lifetime: reopen at once
                elif code is grpc.StatusCode.DEADLINE_EXCEEDED and "idle timeout" in (
                    details or ""
                ):
                    # The learner closes streams that carry nothing (learner/admission.py);
                    # nothing was lost: reopen at once, quietly.
                    clean = True
                    log.debug("cell %s: learner closed idle upload stream", self.cell_id)
                else:
                    log.warning(
                        "cell %s: upload stream %d failed (%s: %s); %d chunks unacked",
                        self.cell_id,
                        generation,
                        code.name if code is not None else "?",
                        details,
                        self.pending,
                    )
            finally:
                if not clean:
                    self._connected = False
                stream.closed.set()
                with self._cond:
                    self._cond.notify_all()
                if stream.call is not None:
                    stream.call.cancel()
            if not clean and not self._stopping.is_set():
                self._wake.clear()
                if not self._stopping.is_set():
                    self._wake.wait(backoff.next())
        with self._cond:
            self._stream = None

    def _next_to_send(self) -> int | None:
        """Submission number of the next chunk this stream may send now (caller locks).

        Chunks go out strictly in submission order, so one still waiting for the disk
        holds back everything after it."""
        n = self._stream_next
        while n < self._next_n and n not in self._pending:
            n += 1
        self._stream_next = n
        if n >= self._next_n or not self._pending[n].ready:
            return None
        return n

    def _requests(self, stream: _Stream) -> Iterator[trajectory_pb2.StepChunk]:
        """The stream's request side: unacked chunks in order, then new ones as they come.

        It also watches acks: if chunks wait and no ack has come for longer than the
        deadline, the call is cancelled so the stream thread reconnects."""
        while True:
            chunk: trajectory_pb2.StepChunk | None = None
            with self._cond:
                while True:
                    if stream.closed.is_set() or self._stopping.is_set():
                        return
                    if self._sent_at:
                        # Stalled = no ack for a deadline while chunks wait. Progress
                        # counts: after an outage a long backlog is in flight at once and
                        # its last chunk may wait many store appends for its ack.
                        oldest = next(iter(self._sent_at.values()))
                        waiting = time.monotonic() - max(oldest, stream.last_ack)
                        if waiting > self.deadline_s:
                            stream.ack_timeout = True
                            break
                    n = self._next_to_send()
                    if n is not None:
                        chunk = self._pending[n].chunk
                        self._stream_next = n + 1
                        self._sent_at[n] = time.monotonic()
                        self._counts["chunks_sent"] += 1
                        if n in self._ever_sent:
                            self._counts["resends"] += 1
                        self._ever_sent.add(n)
                        break
                    self._cond.wait(timeout=0.25)
            if stream.ack_timeout:
                if stream.call is not None:
                    stream.call.cancel()
                return
            if chunk is None:  # evicted from memory: read it back from the spool
                assert self.spool is not None
                try:
                    chunk = self.spool.read(n)
                except Exception:
                    log.exception("cell %s: spooled chunk %d unreadable", self.cell_id, n)
                    if stream.call is not None:
                        stream.call.cancel()
                    return
            yield chunk

    def _on_ack(self, ack: trajectory_pb2.ChunkAck) -> bool:
        """Settle one ack; True when the stream must be reopened to resend from this chunk.

        The learner stores an episode's chunks strictly in seq order, so a chunk it failed
        to store for a passing reason (INTERNAL, UNAVAILABLE, ...) is not dropped: the
        stream is reopened and everything unacked is resent in order, up to
        MAX_TRANSIENT_REJECTS times per chunk. Any other rejection is final: counted and
        logged with the learner's code and message. A settled chunk leaves the spool.
        """
        code = _status(ack.code)
        with self._cond:
            n = self._keys.get((ack.episode_id, ack.seq))
            if n is None:  # a second ack for a resent chunk, or nothing we sent
                log.debug(
                    "cell %s episode %s: extra ack for seq %d",
                    self.cell_id,
                    ack.episode_id,
                    ack.seq,
                )
                return False
            entry = self._pending[n]
            if not ack.durable and code in TRANSIENT_CODES:
                tries = self._transient.get(n, 0) + 1
                self._transient[n] = tries
                if tries <= MAX_TRANSIENT_REJECTS:
                    self._counts["transient_rejects"] += 1
                    log.warning(
                        "cell %s episode %s: learner could not store chunk seq %d now "
                        "(%s: %s); resending from it (try %d of %d)",
                        self.cell_id,
                        ack.episode_id,
                        ack.seq,
                        code.name,
                        ack.message,
                        tries,
                        MAX_TRANSIENT_REJECTS,
                    )
                    return True
            del self._keys[(ack.episode_id, ack.seq)]
            del self._pending[n]
            self._in_memory -= int(entry.chunk is not None)
            self._sent_at.pop(n, None)
            self._ever_sent.discard(n)
            self._transient.pop(n, None)
            if not entry.on_disk and self.spool is not None:
                self._reserved -= entry.size  # a chunk the disk refused, held in memory
            if ack.durable:
                self._counts["chunks_acked"] += 1
                self._counts["steps_acked"] += entry.steps
            else:
                self._counts["rejected"] += 1
            self._cond.notify_all()
        if entry.on_disk and self.spool is not None:
            self.spool.delete(n)  # outside the lock: submit() must never wait on a disk
        if not ack.durable:
            log.error(
                "cell %s episode %s: learner REJECTED chunk seq %d (%d steps, version %r), "
                "not retried (%s): %s",
                self.cell_id,
                ack.episode_id,
                ack.seq,
                entry.steps,
                entry.version,
                code.name,
                ack.message,
            )
        return False


def _status(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN

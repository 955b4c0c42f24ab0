"""Streams a cell's StepChunks to the learner and keeps every chunk until it is acked durable.

The control loop must never wait on the network, so `submit` only appends to a bounded
in-memory queue and a thread of its own drives the bidirectional `TrajectoryService.Upload`
stream. Every chunk stays queued, in order, until its ack arrives; when the stream breaks
the thread reconnects with exponential backoff and jitter and resends all unacked chunks in
order. That is safe because the learner stores each (cell_id, episode_id, seq) once and
acks a resend again. A chunk is dropped only when the queue is full (the learner has been
unreachable for a long time); that is counted and logged loudly, never hidden.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import grpc

from actors.recorder import chunk_steps_of
from protos.fleetlearn.v1 import trajectory_pb2, trajectory_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20  # the gateway accepts this much; camera-heavy chunks need it

# Keepalive pings find a dead learner (or a silently dropped NAT entry) within seconds
# instead of at the next TCP timeout; reconnect backoff stays short so a restarted learner
# is found again quickly. The gateway permits pings every 5 s without calls.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


def open_channel(address: str) -> grpc.Channel:
    """An insecure channel to the learner with the fleet's keepalive and size options."""
    return grpc.insecure_channel(address, options=list(CHANNEL_OPTIONS))


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

    def __init__(self, initial_s: float = 0.2, maximum_s: float = 5.0, factor: float = 2.0):
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


class Uplink:
    """Bounded, ordered, at-least-once delivery of StepChunks over one reconnecting stream."""

    def __init__(
        self,
        address: str,
        *,
        deadline_s: float,
        max_queue: int,
        cell_id: str,
        stream_lifetime_s: float = 300.0,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.address = address
        self.deadline_s = float(deadline_s)
        self.max_queue = int(max_queue)
        self.cell_id = cell_id
        # Every call has a deadline: the stream's is its lifetime, after which it is reopened
        # (unacked chunks are resent); a missing ack is caught sooner by the ack watchdog.
        self.stream_lifetime_s = float(stream_lifetime_s)
        self._cond = threading.Condition()
        self._pending: OrderedDict[int, trajectory_pb2.StepChunk] = OrderedDict()
        self._keys: dict[tuple[str, int], int] = {}
        self._ever_sent: set[int] = set()
        self._transient: dict[int, int] = {}  # transient rejections per chunk so far
        self._sent_at: dict[int, float] = {}  # on the current stream, for the ack watchdog
        self._next_n = 0  # submission number of the next submitted chunk
        self._stream_next = 0  # submission number the current stream sends next
        self._stream: _Stream | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel: grpc.Channel | None = None
        self._connected = False
        self._counts = dict.fromkeys(
            (
                "chunks_sent",
                "chunks_acked",
                "steps_acked",
                "resends",
                "dropped",
                "rejected",
                "transient_rejects",
            ),
            0,
        )

    # -- the control loop's side -------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("uplink already started")
        self._channel = open_channel(self.address)
        self._channel.subscribe(self._on_connectivity, try_to_connect=True)
        self._thread = threading.Thread(
            target=self._run, name=f"uplink-{self.cell_id}", daemon=True
        )
        self._thread.start()
        log.info("cell %s: uplink to %s started", self.cell_id, self.address)

    def submit(self, chunk: trajectory_pb2.StepChunk) -> bool:
        """Queue a chunk for upload without blocking; False (counted, logged) if the queue
        is full or the uplink has stopped."""
        with self._cond:
            if self._stopping.is_set() or len(self._pending) >= self.max_queue:
                self._counts["dropped"] += 1
                dropped = self._counts["dropped"]
                why = (
                    "the uplink is stopped"
                    if self._stopping.is_set()
                    else (f"{self.max_queue} chunks are waiting for acks")
                )
            else:
                n = self._next_n
                self._next_n += 1
                self._pending[n] = chunk
                self._keys[(chunk.episode_id, chunk.seq)] = n
                self._cond.notify_all()
                return True
        log.error(
            "cell %s episode %s: DROPPED chunk seq %d (%d steps, version %r): %s "
            "(%d chunks dropped so far)",
            self.cell_id,
            chunk.episode_id,
            chunk.seq,
            chunk_steps_of(chunk),
            chunk.policy_version,
            why,
            dropped,
        )
        return False

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted chunk is acked (durable or rejected)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending, timeout=max(0.0, timeout_s))

    def stop(self) -> None:
        """Stop streaming; chunks still unacked are logged as lost. Idempotent."""
        with self._cond:
            self._stopping.set()
            stream = self._stream
            self._cond.notify_all()
        if stream is not None and stream.call is not None:
            stream.call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=self.deadline_s + 5.0)
            if self._thread.is_alive():
                log.error("cell %s: uplink thread did not stop", self.cell_id)
        if self._channel is not None:
            self._channel.unsubscribe(self._on_connectivity)
            self._channel.close()
            self._channel = None
        self._connected = False
        with self._cond:
            lost = len(self._pending)
        if lost:
            log.error("cell %s: uplink stopped with %d chunks never acked", self.cell_id, lost)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def stats(self) -> dict[str, Any]:
        with self._cond:
            out: dict[str, Any] = dict(self._counts)
            out["pending"] = len(self._pending)
        out["connected"] = self._connected
        return out

    # -- the stream thread ---------------------------------------------------------------

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        # Acks prove the link up and stream errors prove it down; the channel's own state
        # covers the idle time in between (it is reported with some delay).
        self._connected = state is grpc.ChannelConnectivity.READY

    def _run(self) -> None:
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
                self._stopping.wait(backoff.next())
        with self._cond:
            self._stream = None

    def _next_to_send(self) -> int | None:
        """Submission number of the next chunk this stream has not sent (caller locks)."""
        n = self._stream_next
        while n < self._next_n and n not in self._pending:
            n += 1
        self._stream_next = n
        return n if n < self._next_n else None

    def _requests(self, stream: _Stream) -> Iterator[trajectory_pb2.StepChunk]:
        """The stream's request side: unacked chunks in order, then new ones as they come.

        It also watches acks: if the oldest chunk sent on this stream has waited longer
        than the deadline, the call is cancelled so the stream thread reconnects."""
        while True:
            with self._cond:
                while True:
                    if stream.closed.is_set() or self._stopping.is_set():
                        return
                    if self._sent_at:
                        oldest = next(iter(self._sent_at.values()))
                        if time.monotonic() - oldest > self.deadline_s:
                            stream.ack_timeout = True
                            break
                    n = self._next_to_send()
                    if n is not None:
                        chunk = self._pending[n]
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
            yield chunk

    def _on_ack(self, ack: trajectory_pb2.ChunkAck) -> bool:
        """Settle one ack; True when the stream must be reopened to resend from this chunk.

        The learner stores an episode's chunks strictly in seq order, so a chunk it failed
        to store for a passing reason (INTERNAL, UNAVAILABLE, ...) is not dropped: the
        stream is reopened and everything unacked is resent in order, up to
        MAX_TRANSIENT_REJECTS times per chunk. Any other rejection is final: counted and
        logged with the learner's code and message.
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
            chunk = self._pending[n]
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
            self._sent_at.pop(n, None)
            self._ever_sent.discard(n)
            self._transient.pop(n, None)
            if ack.durable:
                self._counts["chunks_acked"] += 1
                self._counts["steps_acked"] += chunk_steps_of(chunk)
            else:
                self._counts["rejected"] += 1
            self._cond.notify_all()
        if not ack.durable:
            log.error(
                "cell %s episode %s: learner REJECTED chunk seq %d (%d steps, version %r), "
                "not retried (%s): %s",
                self.cell_id,
                ack.episode_id,
                ack.seq,
                chunk_steps_of(chunk),
                chunk.policy_version,
                code.name,
                ack.message,
            )
        return False


def _status(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN

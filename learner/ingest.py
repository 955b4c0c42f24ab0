"""The TrajectoryService servicer: cells stream chunks of steps, the learner acks each once durable.

An ack with durable=True is sent only after the episode store's append returned (which it
does once the chunk is fsynced, learner/store.py) and while the learner lives, so a cell
may drop a chunk from its outbox on that ack and must resend anything else after a failure;
the store's (cell_id, episode_id, seq) idempotency makes those resends harmless. A bad chunk
is answered with durable=False, a gRPC status code and a readable message, and the stream
goes on: one broken chunk must not cost a cell its connection, and no input may take down
the server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping

import grpc
from prometheus_client import Counter, Histogram

from fleet.common.metrics import ACK_LATENCY_BUCKETS
from learner.admission import Admission
from learner.auth import Caller
from learner.chunks import MAX_EPISODE_STEPS, ChunkRejected, DecodedChunk, decode_chunk
from learner.grpc_handlers import add_servicer
from learner.read_ahead import StreamIdle, read_ahead
from learner.store import AppendResult, EpisodeStore, EpisodeSummary
from protos.fleetlearn.v1 import trajectory_pb2, trajectory_pb2_grpc

log = logging.getLogger(__name__)

# Receipt to ack of each chunk (decode + durable append), and refusals by status code.
ACK_SECONDS = Histogram(
    "fleet_ingest_ack_latency_seconds",
    "time from a chunk's receipt to its ack (durable append included)",
    buckets=ACK_LATENCY_BUCKETS,
)
REJECTED_BY_CODE = Counter(
    "fleet_ingest_rejected_by_code", "chunks refused, by gRPC status code", ["code"]
)
for _code in (
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "PERMISSION_DENIED",
    "INTERNAL",
):
    REJECTED_BY_CODE.labels(code=_code)  # zero series exist before the first refusal

_MAX_ECHO = 256  # ids are echoed in acks; a hostile id is cut short


class IngestServicer(trajectory_pb2_grpc.TrajectoryServiceServicer):
    """Validates, stores and acks uploaded chunks; callbacks tell the rest of the learner."""

    def __init__(
        self,
        store: EpisodeStore,
        *,
        known_tasks: Collection[str] | None,
        tokens: Mapping[str, str] | None = None,
        on_episode_end: Callable[[DecodedChunk, EpisodeSummary], None] | None = None,
        on_chunk: Callable[[DecodedChunk], None] | None = None,
        max_steps: int = 1000,
        max_bytes: int = 64 << 20,
        max_episode_steps: int = MAX_EPISODE_STEPS,
        admission: Admission | None = None,
        full_decode: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        # Asked right before each ack leaves (fleet/control/lease.py): an orphan of a dead learner
        # must not tell a cell that a chunk is safe.
        self.alive = alive
        self.known_tasks = None if known_tasks is None else frozenset(known_tasks)
        # Shared with the policy service in the gateway, so caps count a cell's every stream.
        self.admission = admission or Admission(tokens)
        self.full_decode = full_decode
        self.on_episode_end = on_episode_end
        self.on_chunk = on_chunk
        self.max_steps = max_steps
        self.max_bytes = max_bytes
        self.max_episode_steps = max_episode_steps
        self._lock = threading.Lock()
        self._stats = {"chunks_acked": 0, "duplicates": 0, "rejected": 0, "steps_stored": 0}

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: chunks_acked, duplicates, rejected, steps_stored."""
        with self._lock:
            return dict(self._stats)

    def Upload(
        self,
        request_iterator: Iterator[trajectory_pb2.StepChunk],
        context: grpc.ServicerContext,
    ) -> Iterator[trajectory_pb2.ChunkAck]:
        peer = context.peer()
        # One identity per stream: its call credentials, and its client certificate's CN
        # under mutual TLS. Refused here, before a byte of payload is read.
        caller = self.admission.open_stream(context, "Upload")
        idle_s = self.admission.limits.idle_timeout_s
        # The next chunk is received while this one is stored (read_ahead), at most one
        # ahead: a slow store stops reading, and gRPC flow control then holds the cell back.
        chunks = read_ahead(request_iterator, name=f"ingest-read {peer}", idle_timeout_s=idle_s)
        try:
            for msg in chunks:
                revoked = self.admission.revoked(caller)
                if revoked is not None:
                    log.warning("upload from %s closed: %s", peer, revoked)
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, revoked)
                t0 = time.perf_counter()
                ack = self._handle(msg, peer, caller)
                ACK_SECONDS.observe(time.perf_counter() - t0)
                if self.alive is not None and not self.alive():
                    context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        "the learner process behind this server has died; resend to the new one",
                    )
                yield ack
        except StreamIdle:
            message = (
                f"cell {caller.key or peer}: no chunk for {idle_s:g} s on this upload stream; the "
                "learner closed it (idle timeout); open a new stream when there is data"
            )
            log.info("upload from %s closed: %s", peer, message)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)

    def _handle(
        self, msg: trajectory_pb2.StepChunk, peer: str, caller: Caller | None = None
    ) -> trajectory_pb2.ChunkAck:
        """One chunk to one ack; never raises. `caller` None: already authorised."""
        try:
            if caller is not None:
                denied = caller.may_act_as(msg.cell_id)
                if denied is not None:
                    raise ChunkRejected(grpc.StatusCode.PERMISSION_DENIED, denied)
            chunk = decode_chunk(
                msg,
                known_tasks=self.known_tasks,
                max_steps=self.max_steps,
                max_bytes=self.max_bytes,
                max_episode_steps=self.max_episode_steps,
                full_decode=self.full_decode,
            )
            result = self.store.append(chunk)
        except ChunkRejected as exc:
            return self._rejected(msg, exc.code, exc.message, peer)
        except Exception:
            log.exception(
                "cell %s episode %s seq %d: storing the chunk failed",
                msg.cell_id[:_MAX_ECHO],
                msg.episode_id[:_MAX_ECHO],
                msg.seq,
            )
            return self._rejected(
                msg,
                grpc.StatusCode.INTERNAL,
                f"cell {msg.cell_id[:_MAX_ECHO]} episode {msg.episode_id[:_MAX_ECHO]} "
                f"seq {msg.seq}: the learner could not store the chunk (see its log); resend",
                peer,
                logged=True,
            )
        with self._lock:
            self._stats["chunks_acked"] += 1
            if result.duplicate:
                self._stats["duplicates"] += 1
            else:
                self._stats["steps_stored"] += result.steps_written
        if result.duplicate:
            log.debug(
                "cell %s episode %s seq %d: duplicate, acked again",
                chunk.cell_id,
                chunk.episode_id,
                chunk.seq,
            )
        else:
            self._after_append(chunk, result)
        return trajectory_pb2.ChunkAck(
            cell_id=chunk.cell_id,
            episode_id=chunk.episode_id,
            seq=chunk.seq,
            durable=True,
            duplicate=result.duplicate,
        )

    def _after_append(self, chunk: DecodedChunk, result: AppendResult) -> None:
        """Callbacks after a durable append; their failures are logged, never sent back."""
        if self.on_chunk is not None:
            try:
                self.on_chunk(chunk)
            except Exception:
                log.exception(
                    "cell %s episode %s seq %d: on_chunk callback failed",
                    chunk.cell_id,
                    chunk.episode_id,
                    chunk.seq,
                )
        if not chunk.last or self.on_episode_end is None:
            return
        summary = EpisodeSummary(
            steps=result.episode_steps,
            intervention_steps=result.intervention_steps,
            takeovers=result.takeovers,
        )
        try:
            self.on_episode_end(chunk, summary)
        except Exception:
            log.exception(
                "cell %s episode %s (version %s): on_episode_end callback failed",
                chunk.cell_id,
                chunk.episode_id,
                chunk.policy_version or "none",
            )

    def _rejected(
        self,
        msg: trajectory_pb2.StepChunk,
        code: grpc.StatusCode,
        message: str,
        peer: str,
        *,
        logged: bool = False,
    ) -> trajectory_pb2.ChunkAck:
        with self._lock:
            self._stats["rejected"] += 1
        REJECTED_BY_CODE.labels(code=code.name).inc()
        if not logged:
            log.warning("chunk from %s rejected (%s): %s", peer, code.name, message)
        return trajectory_pb2.ChunkAck(
            cell_id=msg.cell_id[:_MAX_ECHO],
            episode_id=msg.episode_id[:_MAX_ECHO],
            seq=msg.seq,
            durable=False,
            duplicate=False,
            code=int(code.value[0]),
            message=message,
        )


def add_to_server(server: grpc.Server, servicer: IngestServicer) -> None:
    """Register the servicer on a grpc server (before it starts); undecodable requests
    get INVALID_ARGUMENT (learner/grpc_handlers.py)."""
    add_servicer(server, trajectory_pb2.DESCRIPTOR.services_by_name["TrajectoryService"], servicer)

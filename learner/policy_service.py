"""PolicyService: how cells learn which version to run, fetch its weights and report in.

Cells never talk to Redis; this servicer is their window onto the registry:

- WatchAssignment: a server stream per cell. It sends the cell's assignment at once, then a
  new one whenever the registry's answer changes. An assignment names the version to act
  with and, while the rollout is in stage "shadow" on that cell, the candidate to run in
  shadow beside it (`Assignment.shadow`: the shadow version's own full assignment, so the
  cell verifies and fetches it exactly like the acting one). One background thread polls
  Redis for all watching cells (three round trips: assignments, shadow assignments,
  prefetches) and wakes
  the streams through a Condition, so a fleet of N cells costs one poll per interval, not N.
  A stream ends when the client cancels; when the servicer stops it ends with UNAVAILABLE,
  so the cell reconnects.
  An assignment also lists the versions the cell may soon run (`Assignment.prefetch`, from
  `Registry.prefetch_assignments`: the candidate for cells on stable, stable for cells on
  the candidate), which the cell fetches ahead so that a promotion or rollback is a swap.
- FetchWeights: the version's safetensors file from an offset, in chunks (paced to the
  request's max_bytes_per_s when a cell prefetches under its bandwidth cap). Each version's
  bytes are read from disk (and checked against the manifest's sha256) once and kept in
  memory for the next cells; the newest few versions stay cached.
- ReportHeartbeat: the cell's state into the registry, stamped with the learner's clock.

Each open watch or fetch (like each upload stream) holds one worker thread of a sync gRPC
server for its lifetime, so each is admitted against the per-cell and global stream caps
first (learner/admission.py), and a watch ends (PERMISSION_DENIED) within a second or so of
its cell being removed from the tokens file. Every field a cell sends is bounded: ids,
`chunk_bytes`, heartbeat strings and numbers, `versions_adopted_json` (size, depth, shape).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NoReturn, TypeVar

import grpc
import redis

from fleet.common.cell_counters import CellCounters
from fleet.common.ids import MAX_ID_LEN
from fleet.common.registry_records import VersionRecord
from fleet.control.registry import CellState, Registry
from learner.admission import Admission
from learner.auth import Caller
from learner.grpc_handlers import add_servicer
from protos.fleetlearn.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)

# A chunk must fit a client's default 4 MiB receive limit with room for the envelope.
MAX_CHUNK_BYTES = 3 << 20
# A client-chosen chunk below this costs a message per few bytes (chunk_bytes=1 was 23,040
# messages in 3 s): refused.
MIN_CHUNK_BYTES = 16 << 10
MAX_FAULT_CHARS = 2048
MAX_ADOPTED_JSON = 64 << 10
MAX_ADOPTED_ENTRIES = 256
# The slowest paced fetch served: a paced stream holds a server thread while it lasts.
MIN_PACED_BYTES_PER_S = 64 << 10
_UNSET = object()
T = TypeVar("T")
# (version to act with, version to run in shadow, versions to prefetch), None where there is
# none.
_Pair = tuple[str | None, str | None, tuple[str, ...]]


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Assignment watch, chunked weight fetch and heartbeats, backed by the Redis registry."""

    def __init__(
        self,
        registry: Registry,
        *,
        tokens: Mapping[str, str] | None = None,
        poll_interval_s: float = 0.25,
        chunk_bytes: int = 1 << 20,
        cache_versions: int = 3,
        admission: Admission | None = None,
    ) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
        self.registry = registry
        # Shared with ingest in the gateway, so caps count a cell's every stream.
        self.admission = admission or Admission(tokens)
        self.poll_interval_s = poll_interval_s
        self.chunk_bytes = chunk_bytes
        self.cache_versions = max(1, cache_versions)
        # Watches: how many streams each cell has open, and its latest known assignment.
        self._cond = threading.Condition()
        self._watchers: Counter[str] = Counter()
        self._assigned: dict[str, _Pair] = {}
        self._stopped = False
        self._stop_event = threading.Event()
        self._poller: threading.Thread | None = None
        # Versions are immutable: their records, Assignment messages and bytes are cached.
        self._records: dict[str, VersionRecord] = {}
        self._messages: dict[str, policy_pb2.Assignment] = {}
        self._weights: OrderedDict[str, bytes] = OrderedDict()
        # The cached versions' WeightsChunk messages on the default chunk grid, built once:
        # every cell's fetch from offset 0 (or a resume on the grid) reuses them instead of
        # slicing and copying the file into new messages (~0.05 s of learner CPU per cell
        # per 100 MB). Costs a second copy of each cached version in memory.
        self._chunks: dict[str, tuple[policy_pb2.WeightsChunk, ...]] = {}
        self._cache_lock = threading.Lock()
        self._load_lock = threading.Lock()
        # Distribution figures per version: weight bytes sent to cells, and reads of the file
        # from disk (one per version while it stays cached, however many cells fetch it).
        self.bytes_sent: Counter[str] = Counter()
        self.disk_reads: Counter[str] = Counter()

    # -- RPCs ----------------------------------------------------------------------------

    def WatchAssignment(
        self, request: policy_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.Assignment]:
        cell_id = request.cell_id
        caller = self._authorise(cell_id, context, stream="WatchAssignment")
        if len(request.current_version) > MAX_ID_LEN:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "current_version is too long")
        current = self._registry_call(context, self._lookup, [cell_id])[cell_id]
        with self._cond:
            if self._stopped:
                context.abort(grpc.StatusCode.UNAVAILABLE, "policy service is stopping; reconnect")
            self._assigned.setdefault(cell_id, current)  # the poller's value, if it has one
            self._watchers[cell_id] += 1
            self._ensure_poller()
        context.add_callback(self._wake_all)
        log.info("cell %s watches its assignment (runs %r)", cell_id, request.current_version)
        sent: object = _UNSET
        revoked: str | None = None
        try:
            while True:
                with self._cond:
                    while (
                        not self._stopped
                        and context.is_active()
                        and self._assigned.get(cell_id) == sent
                        and (revoked := self.admission.revoked(caller)) is None
                    ):
                        self._cond.wait(timeout=1.0)
                    if self._stopped or not context.is_active() or revoked is not None:
                        break
                    pair = self._assigned.get(cell_id, (None, None, ()))
                yield self._with_shadow(pair, context)
                sent = pair
        finally:
            with self._cond:
                self._watchers[cell_id] -= 1
                if self._watchers[cell_id] <= 0:
                    del self._watchers[cell_id]
                    self._assigned.pop(cell_id, None)
        if revoked is not None:
            log.warning("cell %s: assignment watch closed: %s", cell_id, revoked)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, revoked)
        if self._stopped and context.is_active():
            context.abort(grpc.StatusCode.UNAVAILABLE, "policy service is stopping; reconnect")

    def FetchWeights(
        self, request: policy_pb2.FetchRequest, context: grpc.ServicerContext
    ) -> Iterator[policy_pb2.WeightsChunk]:
        caller = self._authorise(request.cell_id, context, stream="FetchWeights")
        version_id = request.version_id
        if len(version_id) > MAX_ID_LEN:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "version_id is too long")
        if request.chunk_bytes and not MIN_CHUNK_BYTES <= request.chunk_bytes <= MAX_CHUNK_BYTES:
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk_bytes {request.chunk_bytes} is out of range: 0 (the learner's default) "
                f"or {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}",
            )
        record = self._record(version_id, context)
        if record is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown policy version {version_id!r}")
        data = self._weights_bytes(version_id, record, context)
        total = len(data)
        offset = request.offset
        if offset > total:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"offset {offset} is past the end of version {version_id!r} ({total} bytes)",
            )
        step = min(request.chunk_bytes or self.chunk_bytes, MAX_CHUNK_BYTES)
        if offset == total:  # nothing left: say so, with the size, in one empty chunk
            yield policy_pb2.WeightsChunk(offset=total, data=b"", total_bytes=total)
            return
        rate = float(request.max_bytes_per_s)  # a prefetch's cap; 0 = unpaced
        if 0 < rate < MIN_PACED_BYTES_PER_S:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_bytes_per_s {request.max_bytes_per_s} is below the slowest paced fetch "
                f"served ({MIN_PACED_BYTES_PER_S} bytes/s); ask for more, or 0 for unpaced",
            )
        paced_from: float | None = None  # when the first chunk left
        paced_bytes = 0
        prebuilt = (
            self._chunk_messages(version_id, data)
            if step == self.chunk_bytes and offset % step == 0
            else None
        )
        for start in range(offset, total, step):
            if rate > 0 and paced_from is None:
                paced_from = time.monotonic()
            elif rate > 0 and not self._pace(context, paced_from + paced_bytes / rate):
                return
            if not context.is_active():
                return
            revoked = self.admission.revoked(caller)
            if revoked is not None:  # removed from the tokens file mid-download
                _abort(context, grpc.StatusCode.PERMISSION_DENIED, revoked)
            paced_bytes += min(step, total - start)
            if prebuilt is not None:
                message = prebuilt[start // step]
            else:
                message = policy_pb2.WeightsChunk(
                    offset=start, data=data[start : start + step], total_bytes=total
                )
            with self._cache_lock:
                self.bytes_sent[version_id] += min(step, total - start)
            yield message

    def _pace(self, context: grpc.ServicerContext, until: float) -> bool:
        """Waits until the monotonic time `until` (a paced fetch's next chunk is due); False
        when the call ended or the servicer stops meanwhile."""
        while (wait := until - time.monotonic()) > 0:
            if self._stop_event.wait(min(wait, 0.1)) or not context.is_active():
                return False
        return True

    def ReportHeartbeat(
        self, request: policy_pb2.Heartbeat, context: grpc.ServicerContext
    ) -> policy_pb2.HeartbeatReply:
        self._authorise(request.cell_id, context)
        problem = _heartbeat_problem(request)
        if problem is not None:
            _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cell {request.cell_id}: heartbeat {problem}",
            )
        adopted = json.loads(request.versions_adopted_json or "[]")
        now = time.time()
        state = CellState(
            cell_id=request.cell_id,
            version_running=request.version_running,
            task=request.task,
            counters=CellCounters.from_heartbeat(request),
            last_fault=request.last_fault,
            shadow_version=request.shadow_version,
            versions_adopted=adopted,
            last_seen=now,  # the learner's clock: cells' clocks need not agree with it
            alive=True,
        )
        self._registry_call(context, self.registry.record_heartbeat, state)
        return policy_pb2.HeartbeatReply(server_time=now)

    def stop(self) -> None:
        """End every watch (UNAVAILABLE) and the poller. Idempotent."""
        with self._cond:
            self._stopped = True
            self._stop_event.set()
            self._cond.notify_all()
            poller, self._poller = self._poller, None
        if poller is not None:
            poller.join(timeout=5.0)

    # -- watch machinery -----------------------------------------------------------------

    def _wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _ensure_poller(self) -> None:
        """Start the single poll thread (caller holds self._cond)."""
        if self._poller is None:
            self._poller = threading.Thread(
                target=self._poll_loop, name="policy-assignments", daemon=True
            )
            self._poller.start()

    def _poll_loop(self) -> None:
        failing = False
        while True:
            with self._cond:
                while not self._stopped and not self._watchers:
                    self._cond.wait()
                if self._stopped:
                    return
                cells = list(self._watchers)
            try:
                latest = self._lookup(cells)
            except redis.RedisError as exc:
                if not failing:
                    log.warning("cannot poll assignments from the registry: %s", exc)
                failing = True
            else:
                if failing:
                    log.info("registry reachable again; assignments polled")
                failing = False
                with self._cond:
                    changed = False
                    for cell_id, pair in latest.items():
                        if cell_id in self._watchers and self._assigned.get(cell_id) != pair:
                            self._assigned[cell_id] = pair
                            changed = True
                    if changed:
                        self._cond.notify_all()
            self._stop_event.wait(self.poll_interval_s)

    def _lookup(self, cells: list[str]) -> dict[str, _Pair]:
        """(acting version, shadow version, versions to prefetch) per cell from the
        registry."""
        acting = self.registry.assignments(cells)
        shadow = self.registry.shadow_assignments(cells)
        prefetch = self.registry.prefetch_assignments(cells)
        return {c: (acting.get(c), shadow.get(c), tuple(prefetch.get(c, ()))) for c in cells}

    def _with_shadow(self, pair: _Pair, context: grpc.ServicerContext) -> policy_pb2.Assignment:
        """The acting version's Assignment, plus the shadow version's and the versions to
        prefetch when there are any. The cached per-version messages are never mutated: an
        assignment with more is a copy."""
        version_id, shadow_id, prefetch_ids = pair
        base = self._assignment(version_id, context)
        shadow = self._assignment(shadow_id, context) if shadow_id else None
        if shadow is not None and not shadow.version_id:  # unknown: logged in _assignment
            shadow = None
        ahead = [
            message
            for message in (
                self._assignment(v, context)
                for v in prefetch_ids
                if v and v not in (version_id, shadow_id)
            )
            if message.version_id
        ]
        if shadow is None and not ahead:
            return base
        message = policy_pb2.Assignment()
        message.CopyFrom(base)
        if shadow is not None:
            message.shadow_version_id = shadow.version_id
            message.shadow.CopyFrom(shadow)
        message.prefetch.extend(ahead)
        return message

    def _assignment(
        self, version_id: str | None, context: grpc.ServicerContext
    ) -> policy_pb2.Assignment:
        if not version_id:
            return policy_pb2.Assignment(version_id="")
        with self._cache_lock:
            message = self._messages.get(version_id)
        if message is not None:
            return message
        record = self._record(version_id, context)
        if record is None:  # stable names a version the registry does not hold
            log.error("assignment names unknown version %r; sending none", version_id)
            return policy_pb2.Assignment(version_id="")
        try:
            size = os.path.getsize(record.weights_path)
        except OSError as exc:
            log.error("weights of version %s unreadable: %s", version_id, exc)
            size = 0
        # The record as the registry serves it (with its newest evaluation), less where the
        # weights lie on the learner and when they were registered.
        manifest = {
            k: v for k, v in record.to_json().items() if k not in ("weights_path", "published_at")
        }
        message = policy_pb2.Assignment(
            version_id=version_id,
            manifest_json=json.dumps(manifest, sort_keys=True),
            size_bytes=size,
            sha256=record.manifest.get("sha256") or "",
            signature=record.manifest.get("signature") or "",
            published_at=record.published_at,
        )
        if size:
            with self._cache_lock:
                self._messages[version_id] = message
        return message

    # -- versions and weights ------------------------------------------------------------

    def _record(self, version_id: str, context: grpc.ServicerContext) -> VersionRecord | None:
        if not version_id:
            return None
        with self._cache_lock:
            record = self._records.get(version_id)
        if record is None:
            record = self._registry_call(context, self.registry.version, version_id)
            if record is not None:
                with self._cache_lock:
                    self._records[version_id] = record
        return record

    def _weights_bytes(
        self, version_id: str, record: VersionRecord, context: grpc.ServicerContext
    ) -> bytes:
        """The version's file, read and verified once, then served from memory."""
        with self._cache_lock:
            data = self._weights.get(version_id)
            if data is not None:
                self._weights.move_to_end(version_id)
                return data
        with self._load_lock:  # one reader per miss, even when many cells ask at once
            with self._cache_lock:
                data = self._weights.get(version_id)
            if data is not None:
                return data
            path = record.weights_path
            try:
                with open(path, "rb") as f:
                    data = f.read()
                self.disk_reads[version_id] += 1
            except OSError as exc:
                log.error("weights of version %s unreadable at %s: %s", version_id, path, exc)
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"weights of version {version_id!r} are missing on the learner: {exc}",
                )
            expected = record.manifest.get("sha256") or ""
            if expected and hashlib.sha256(data).hexdigest() != expected:
                log.error("weights of version %s at %s do not match their sha256", version_id, path)
                context.abort(
                    grpc.StatusCode.DATA_LOSS,
                    f"weights of version {version_id!r} on the learner do not match the manifest",
                )
            with self._cache_lock:
                self._weights[version_id] = data
                while len(self._weights) > self.cache_versions:
                    evicted, _ = self._weights.popitem(last=False)
                    self._chunks.pop(evicted, None)
                    log.debug("weights cache dropped version %s", evicted)
            log.info("weights of version %s cached (%d bytes)", version_id, len(data))
            return data

    def _chunk_messages(self, version_id: str, data: bytes) -> tuple[policy_pb2.WeightsChunk, ...]:
        """The version's messages on the default chunk grid, built on first use. Sent as
        they are to every stream (never mutated), like the cached Assignment messages."""
        with self._cache_lock:
            chunks = self._chunks.get(version_id)
        if chunks is not None:
            return chunks
        with self._load_lock:
            with self._cache_lock:
                chunks = self._chunks.get(version_id)
            if chunks is None:
                step, total = self.chunk_bytes, len(data)
                chunks = tuple(
                    policy_pb2.WeightsChunk(
                        offset=start, data=data[start : start + step], total_bytes=total
                    )
                    for start in range(0, total, step)
                )
                with self._cache_lock:
                    if version_id in self._weights:  # not evicted meanwhile
                        self._chunks[version_id] = chunks
            return chunks

    # -- helpers -------------------------------------------------------------------------

    def _authorise(
        self, cell_id: str, context: grpc.ServicerContext, *, stream: str = ""
    ) -> Caller:
        """The caller, checked to act as `cell_id`; a stream is admitted under the caps."""
        if not cell_id:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "cell_id is required")
        if len(cell_id) > MAX_ID_LEN:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"cell_id over {MAX_ID_LEN} chars")
        # Call credentials and, over mutual TLS, the certificate's CN (learner/auth.py).
        if stream:
            caller = self.admission.open_stream(context, stream, claimed=cell_id)
        else:
            caller = self.admission.caller(context)
        denied = caller.may_act_as(cell_id)
        if denied is not None:
            _abort(context, grpc.StatusCode.PERMISSION_DENIED, denied)
        return caller

    def _registry_call(self, context: grpc.ServicerContext, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except redis.RedisError as exc:
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"fleet registry unreachable: {exc}")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _heartbeat_problem(beat: policy_pb2.Heartbeat) -> str | None:
    """What is out of bounds in a heartbeat, or None. Checked before any JSON is parsed
    deeper than its size allows (a deeply nested document cannot reach the parser)."""
    for name in ("version_running", "task", "shadow_version"):
        if len(getattr(beat, name)) > MAX_ID_LEN:
            return f"{name} is longer than {MAX_ID_LEN} characters"
    if len(beat.last_fault) > MAX_FAULT_CHARS:
        return f"last_fault is {len(beat.last_fault)} characters, at most {MAX_FAULT_CHARS}"
    for name in ("loop_hz", "sent_at"):
        if not math.isfinite(getattr(beat, name)):
            return f"{name} is not a finite number"
    text = beat.versions_adopted_json or "[]"
    if len(text) > MAX_ADOPTED_JSON:
        return f"versions_adopted_json is {len(text)} characters, at most {MAX_ADOPTED_JSON}"
    depth = 0
    for ch in text:  # a list of flat objects nests two deep; refuse deeper before parsing
        depth += (ch in "[{") - (ch in "]}")
        if depth > 2:
            return "versions_adopted_json nests deeper than a list of flat objects"
    try:
        adopted = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"versions_adopted_json is not JSON: {exc}"
    if (
        not isinstance(adopted, list)
        or len(adopted) > MAX_ADOPTED_ENTRIES
        or not all(isinstance(a, dict) for a in adopted)
    ):
        return (
            f"versions_adopted_json must be a list of at most {MAX_ADOPTED_ENTRIES} "
            "{version, adopted_at} objects"
        )
    return None


def add_to_server(server: grpc.Server, servicer: PolicyServicer) -> None:
    """Register on a server (before it starts); undecodable requests get INVALID_ARGUMENT."""
    add_servicer(server, policy_pb2.DESCRIPTOR.services_by_name["PolicyService"], servicer)

"""Who may open a call on the gateway, and how many streams each cell may hold.

Why caps on a sync server rather than moving the streams to grpc.aio: every stream on the
sync server holds one worker thread for its life, so without limits one cell holding idle
streams starved the pool and stalled every other cell. grpc.aio would make an idle stream
cheap, but (a) a cell could still open streams without bound and cost memory and file
descriptors, so per-cell and global caps are needed either way, and (b) all the work behind
a stream (protobuf checks, zarr appends, fsync, Redis) is blocking and would go back to a
thread pool anyway. So the servers stay sync and every stream is admitted here first:

- per cell: at most `per_cell` open streams of any kind (a cell needs an Upload, a
  WatchAssignment and one or two FetchWeights at once);
- in all: at most `total` open streams, and the gateway's thread pool is sized `total +
  unary_reserve`, so unary calls (heartbeats) and refusals always find a free worker;
- idle: an Upload that sends nothing for `idle_timeout_s` is closed (DEADLINE_EXCEEDED with
  a message); keepalive pings (`server_options`) find peers that vanished;
- rate: each cell may start at most `calls_per_s` calls a second (bursts of `call_burst`),
  unary and streams alike; a cell's edge makes about one a second (its heartbeat), so a
  cell flooding heartbeats or churning streams is refused (RESOURCE_EXHAUSTED) before it
  costs Redis writes or other cells their workers;
- lifetime: any stream still open after `max_stream_s` is cancelled by the server, whatever
  deadline the client set (or none), so a peer that stops reading a FetchWeights or holds a
  watch forever gives its worker back. The edge's own streams end well before (300 s).

A refused stream costs a worker for microseconds: the caps are checked from the call's
metadata, before a byte of payload is read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from learner.auth import Caller, Refused, authenticate, still_allowed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamLimits:
    """Caps and timeouts for the gateway's streams (see the module docstring)."""

    per_cell: int = 8
    total: int = 96
    unary_reserve: int = 16
    idle_timeout_s: float = 60.0
    max_stream_s: float = 900.0
    calls_per_s: float = 20.0
    call_burst: float = 40.0
    keepalive_time_s: float = 20.0
    keepalive_timeout_s: float = 10.0

    @property
    def workers(self) -> int:
        """Threads the gateway's server needs so streams can never starve unary calls."""
        return self.total + self.unary_reserve

    def server_options(self) -> list[tuple[str, Any]]:
        """gRPC server options: keepalive both ways, and a bound on queued calls."""
        return [
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 2),
        ]


class Admission:
    """Authenticates calls and counts open streams per cell and in all."""

    def __init__(
        self, tokens: Mapping[str, str] | None, limits: StreamLimits | None = None
    ) -> None:
        self.tokens = tokens
        self.limits = limits or StreamLimits()
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()
        self._total = 0
        self.refused: Counter[str] = Counter()  # by status code name
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (calls left, when)

    def caller(self, context: grpc.ServicerContext) -> Caller:
        """Authenticate a call and charge it to its cell's call rate; aborts when refused."""
        try:
            caller = authenticate(context, self.tokens)
        except Refused as exc:
            self._refuse(context, exc.code, exc.message)
        if caller.key and not self._take_call(caller.key):
            self._refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"cell {caller.key!r} makes calls faster than {self.limits.calls_per_s:g} a "
                "second, the most one cell may; slow down and retry",
            )
        return caller

    def _take_call(self, key: str) -> bool:
        """Token bucket per cell: True when this call is within the cell's rate."""
        now, limits = time.monotonic(), self.limits
        with self._lock:
            if len(self._buckets) > 10_000:  # claimed ids under --insecure: forget idle ones
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60.0}
            left, then = self._buckets.get(key, (limits.call_burst, now))
            left = min(limits.call_burst, left + (now - then) * limits.calls_per_s)
            if left < 1.0:
                self._buckets[key] = (left, now)
                return False
            self._buckets[key] = (left - 1.0, now)
            return True

    def open_stream(self, context: grpc.ServicerContext, kind: str, claimed: str = "") -> Caller:
        """Authenticate and admit a stream; aborts it when refused. The stream's place is
        given back when the call ends, however it ends (a termination callback, not the
        handler's own `finally`, which a dropped generator may run late). `claimed`: the
        cell id in the request, counted against when the call itself names no cell
        (--insecure)."""
        caller = self.caller(context)
        if not caller.key and claimed:
            caller = Caller(caller.cell_id, claimed, caller.token)
        limits = self.limits
        with self._lock:
            if caller.key and self._open[caller.key] >= limits.per_cell:
                message = (
                    f"cell {caller.key!r} already has {self._open[caller.key]} open streams, "
                    f"the most one cell may hold; close one before opening this {kind}"
                )
            elif self._total >= limits.total:
                message = (
                    f"the learner has {self._total} open streams, its limit; retry this "
                    f"{kind} in a few seconds"
                )
            else:
                self._open[caller.key] += 1
                self._total += 1
                message = ""
        if message:
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        once = threading.Lock()

        def expire() -> None:
            log.warning(
                "%s of cell %s open for %.0f s, the most a stream may last: cancelled",
                kind,
                caller.key or "-",
                limits.max_stream_s,
            )
            context.cancel()

        timer = threading.Timer(limits.max_stream_s, expire)
        timer.daemon = True

        def release() -> None:
            if once.acquire(blocking=False):  # the callback and the fallback run it once
                timer.cancel()
                self._close_stream(caller)

        timer.start()
        if not context.add_callback(release):
            release()  # the call has already ended
            self._refuse(context, grpc.StatusCode.CANCELLED, f"{kind} ended before it began")
        return caller

    def _close_stream(self, caller: Caller) -> None:
        with self._lock:
            self._open[caller.key] -= 1
            if self._open[caller.key] <= 0:
                del self._open[caller.key]
            self._total -= 1

    def revoked(self, caller: Caller) -> str | None:
        """Why `caller` may no longer go on (removed from the tokens file), or None."""
        return still_allowed(caller, self.tokens)

    def open_streams(self) -> dict[str, int]:
        """Open streams per cell now ("" = streams that named no cell)."""
        with self._lock:
            return dict(self._open)

    def total_open(self) -> int:
        with self._lock:
            return self._total

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, msg: str) -> NoReturn:
        with self._lock:
            self.refused[code.name] += 1
            n = self.refused[code.name]
        if n == 1 or n % 100 == 0:  # a flood of refusals logs once a hundred
            log.warning(
                "call from %s refused (%s, %d so far): %s", context.peer(), code.name, n, msg
            )
        context.abort(code, msg)
        raise AssertionError("context.abort returned")  # pragma: no cover

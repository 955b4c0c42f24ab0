"""Reports the cell's state to the learner every interval, so the fleet view stays live.

A heartbeat is advisory: a missed one only makes the cell look stale for a moment, so
failures are logged (once per outage, then on recovery) and never raised into the actor.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from actors.uplink import open_channel
from protos.fleetlearn.v1 import policy_pb2, policy_pb2_grpc

log = logging.getLogger(__name__)


class HeartbeatSender:
    """A thread that sends `snapshot()` via ReportHeartbeat every `interval_s`."""

    def __init__(
        self,
        address: str,
        snapshot: Callable[[], policy_pb2.Heartbeat],
        *,
        interval_s: float,
        deadline_s: float,
        cell_id: str = "",
    ) -> None:
        self.address = address
        self.snapshot = snapshot
        self.interval_s = float(interval_s)
        self.deadline_s = float(deadline_s)
        self.cell_id = cell_id
        self.sent = 0
        self.failed = 0
        self._failing = False
        self._closed = False
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._channel = open_channel(address)
        self._stub = policy_pb2_grpc.PolicyServiceStub(self._channel)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("heartbeat sender already started")
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{self.cell_id}", daemon=True
        )
        self._thread.start()

    def send_now(self, timeout_s: float | None = None) -> bool:
        """Send one heartbeat now; True if the learner took it. Never raises."""
        with self._send_lock:
            if self._closed:
                return False
            try:
                beat = self.snapshot()
                self._stub.ReportHeartbeat(
                    beat, timeout=self.deadline_s if timeout_s is None else timeout_s
                )
            except grpc.RpcError as exc:
                self.failed += 1
                if not self._failing:
                    code = exc.code()
                    log.warning(
                        "cell %s: heartbeat failed (%s: %s); retrying every %.1f s",
                        self.cell_id,
                        code.name if code is not None else "?",
                        exc.details(),
                        self.interval_s,
                    )
                self._failing = True
                return False
            except Exception:
                self.failed += 1
                log.exception("cell %s: heartbeat snapshot failed", self.cell_id)
                return False
            if self._failing:
                log.info("cell %s: heartbeats reach the learner again", self.cell_id)
            self._failing = False
            self.sent += 1
            return True

    def stop(self, *, final: bool = False) -> bool:
        """Stop the thread; with `final`, send one last heartbeat (the final counts) first.
        Returns whether that last heartbeat reached the learner."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.deadline_s + 5.0)
        delivered = self.send_now() if final else False
        with self._send_lock:
            self._closed = True
            self._channel.close()
        return delivered

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.send_now()
            self._stopping.wait(self.interval_s)

"""One cell's whole edge actor: uplink, policy watcher, heartbeat and the control loop.

`run_actor` owns the order things start and stop in. The threads that talk to the learner
start first, the loop runs in the caller's thread until `stop`, and on the way out the
episode in progress is closed, the uplink is drained (every recorded step acked durable,
within a time limit), a last heartbeat tells the learner the final counts, and only then
do the threads stop.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from actors.config import ActorConfig
from actors.control_loop import ControlLoop
from actors.heartbeat import HeartbeatSender
from actors.policy_watch import PolicyWatcher, RunnerFactory
from actors.spool import ChunkSpool
from actors.thread_priority import ordinary_this_thread, realtime_this_thread
from actors.uplink import Uplink
from actors.version_cache import VersionCache
from drivers.interfaces import Clock, Operator, TaskScene
from fleet.common import metrics
from fleet.common.cell_counters import CellCounters, LoopCounters
from fleet.common.signing import load_public_key
from protos.fleetlearn.v1 import policy_pb2

if TYPE_CHECKING:
    from drivers.cell import CellHardware

log = logging.getLogger(__name__)

MAX_ADOPTIONS_IN_HEARTBEAT = 50  # the heartbeat carries the recent ones; the summary all
GIL_SWITCH_INTERVAL_S = 0.0005  # see run_actor
FAULT_CLEAR_S = 60.0  # a fault leaves the heartbeat's last_fault after this long fault-free


class CellLike(Protocol):
    hardware: CellHardware
    scene: TaskScene
    operator: Operator
    clock: Clock


class FaultLog:
    """Faults any part of the actor reported, for heartbeats and the summary.

    The heartbeat's `last_fault` is `current()`: the newest fault, but only until the cell
    has run `clear_after_s` (FAULT_CLEAR_S, 60 s) without another one; then it reads "".
    So a fault an operator sees in `fleet status` or the dashboard is at most that old (a
    cell that recovered stops showing it), while `count` (the heartbeat's `fault_count`)
    keeps every fault since the actor started, so a recovered cell still shows that it
    faulted. `last` keeps the newest fault ever, for the run's summary.
    """

    def __init__(
        self,
        clear_after_s: float | None = None,  # None: FAULT_CLEAR_S
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self.clear_after_s = FAULT_CLEAR_S if clear_after_s is None else clear_after_s
        self._clock = clock
        self._last_at = 0.0
        self.last = ""
        self.count = 0

    def report(self, message: str) -> None:
        with self._lock:
            self.last = message
            self.count += 1
            self._last_at = self._clock()

    def current(self) -> str:
        """The newest fault while it is recent, else ""."""
        with self._lock:
            if self.last and self._clock() - self._last_at < self.clear_after_s:
                return self.last
            return ""


def run_actor(
    config: ActorConfig,
    cell: CellLike,
    stop: threading.Event,
    *,
    drain_timeout_s: float = 30.0,
    runner_factory: RunnerFactory | None = None,
) -> dict[str, Any]:
    """Run the cell until `stop` is set, then drain and return a summary of counts."""
    faults = FaultLog()
    spool = ChunkSpool(config.spool_dir, config.spool_quota_bytes) if config.spool_dir else None
    uplink = Uplink(
        config.learner_address,
        deadline_s=config.rpc_deadline_s,
        max_queue=config.uplink_queue_chunks,
        cell_id=config.cell_id,
        spool=spool,
        on_fault=faults.report,
    )
    watcher = PolicyWatcher(
        config.learner_address,
        config.cell_id,
        deadline_s=config.rpc_deadline_s,
        on_fault=faults.report,
        runner_factory=runner_factory,
        verify_key=load_public_key(Path(config.verify_key)) if config.verify_key else None,
        prefetch_bytes_per_s=config.prefetch_bytes_per_s,
        cache=VersionCache(
            Path(config.version_cache_dir),
            max_bytes=config.version_cache_max_bytes,
            cell_id=config.cell_id,
        )
        if config.version_cache_dir
        else None,
    )
    loop = ControlLoop(
        config,
        cell.hardware,
        cell.scene,
        cell.operator,
        cell.clock,
        uplink,
        watcher,
        on_fault=faults.report,
    )

    def snapshot() -> policy_pb2.Heartbeat:
        s = loop.stats
        up = uplink.stats
        counters = CellCounters.from_loop(
            LoopCounters.from_stats(s),
            loop_hz=s["loop_hz"],
            steps_acked=up["steps_acked"],
            fault_count=faults.count,
            spool_bytes=up.get("spool_bytes", 0),
            spool_chunks=up.get("spool_chunks", 0),
        )
        adopted = s["versions_adopted"][-MAX_ADOPTIONS_IN_HEARTBEAT:]
        beat = policy_pb2.Heartbeat(
            cell_id=config.cell_id,
            version_running=s["version_running"],
            task=s["task"],
            last_fault=faults.current(),
            shadow_version=s.get("shadow_version", ""),
            sent_at=cell.clock.now(),
            versions_adopted_json=json.dumps(adopted),
        )
        return counters.fill_heartbeat(beat)

    heartbeat = HeartbeatSender(
        config.learner_address,
        snapshot,
        interval_s=config.heartbeat_interval_s,
        deadline_s=config.rpc_deadline_s,
        cell_id=config.cell_id,
    )

    def edge_numbers() -> dict[str, Any]:
        s = loop.stats
        bus = getattr(cell.hardware, "bus_stats", dict)()
        return {**s, **bus, "policy_swaps": len(s["versions_adopted"]), "faults": faults.count}

    def running() -> tuple[str, str, dict[str, str]]:
        s = loop.stats
        labels = {
            "version": s["version_running"] or "none",
            "task": s["task"],
            "shadow": s.get("shadow_version") or "none",
        }
        return (
            "fleet_edge_running",
            "the policy version, task and shadow version this cell runs now",
            labels,
        )

    cell_label = {"cell": config.cell_id}
    unregister_edge = metrics.register(
        metrics.StatsCollector(edge_numbers, metrics.EDGE_STATS, labels=cell_label, info=running)
    )
    unregister_uplink = metrics.register(
        metrics.StatsCollector(lambda: uplink.stats, metrics.UPLINK_STATS, labels=cell_label)
    )
    log.info("cell %s: edge actor starting, learner at %s", config.cell_id, config.learner_address)
    uplink.start()
    watcher.start()
    heartbeat.start()
    # Everything built so far (drivers, the model, gRPC, torch) lives as long as the actor:
    # frozen out of the collector, a full collection no longer walks it, so the pauses the
    # tick thread can meet when it happens to trigger one stay short.
    gc.collect()
    gc.freeze()
    # A thread that wants the GIL waits up to the switch interval (5 ms by default) for the
    # one holding it (encoding, gRPC, inference in Python) to let go: the tick thread,
    # woken for its deadline, must not wait that long.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(switch_interval, GIL_SWITCH_INTERVAL_S))
    # This thread runs the loop: under SCHED_FIFO if the cell asks (threads it starts later,
    # inference and recording, stay ordinary: see actors/thread_priority.py). A real cell's
    # arms tick in a servo process, which took the priority itself: the loop here only
    # follows its ticks and stays ordinary.
    servo_ticks = bool(getattr(cell.hardware, "ticks_itself", False))
    realtime = (
        config.realtime_priority > 0
        and not servo_ticks
        and realtime_this_thread(config.realtime_priority, cell_id=config.cell_id)
    )
    flushed = False
    drain_s = 0.0
    try:
        loop.run(stop)
    finally:
        if realtime:
            ordinary_this_thread()  # the drain and whatever the caller does next
        try:
            cell.hardware.hold()
        except Exception:
            log.exception("cell %s: could not hold the arms after the loop", config.cell_id)
        watcher.stop()
        t0 = time.monotonic()
        flushed = uplink.flush(drain_timeout_s)
        drain_s = time.monotonic() - t0
        if not flushed:
            log.error(
                "cell %s: %d chunks still unacked after %.1f s of draining",
                config.cell_id,
                uplink.pending,
                drain_timeout_s,
            )
        heartbeat.stop(final=True)  # the final counts, after the drain
        uplink.stop()
        unregister_edge()
        unregister_uplink()
        sys.setswitchinterval(switch_interval)  # the process may go on to other things
        gc.unfreeze()
    stats = loop.stats
    up = uplink.stats
    summary: dict[str, Any] = {
        "cell_id": config.cell_id,
        "steps_sent": up["steps_acked"],
        "steps_recorded": stats["steps_recorded"],
        "episodes": stats["episodes"],
        "episodes_aborted": stats["episodes_aborted"],
        "successes": stats["successes"],
        "interventions": stats["interventions"],
        "versions_adopted": [a["version"] for a in stats["versions_adopted"]],
        "adoptions": stats["versions_adopted"],
        "dropped": up["dropped"],
        "dropped_steps": up["dropped_steps"],
        "spool_bytes": up["spool_bytes"],
        "spool_chunks": up["spool_chunks"],
        "spool_write_ms": up["spool_write_ms"],
        "recovered": up["recovered"],
        "rejected": up["rejected"],
        "resends": up["resends"],
        "chunks_acked": up["chunks_acked"],
        "unacked": up["pending"],
        "flushed": flushed,
        "drain_s": round(drain_s, 3),
        "late_ticks": stats["late_ticks"],
        "loop_hz": stats["loop_hz"],
        "realtime_priority": (
            int(getattr(cell.hardware, "realtime_priority", 0))
            if servo_ticks
            else config.realtime_priority
            if realtime
            else 0
        ),
        "policy_errors": stats["policy_errors"],
        "faults": faults.count,
        "last_fault": faults.last,
    }
    log.info(
        "cell %s: edge actor done: %d of %d steps acked, %d episodes, versions %s",
        config.cell_id,
        summary["steps_sent"],
        summary["steps_recorded"],
        summary["episodes"],
        summary["versions_adopted"],
    )
    return summary

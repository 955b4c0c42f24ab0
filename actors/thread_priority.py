"""Per-thread CPU priority on a cell computer.

Work beside the control loop (inference, fetching and loading versions) may take a core for
a while; on Linux such a thread lowers its own priority (a per-thread nice) so that, on a busy
cell computer, the control loop's thread always gets the core first.

A cell may also run the loop's own thread under the real-time FIFO policy (the cell config's
`realtime_priority`), as robot controllers do: woken for its tick, it preempts every ordinary
thread at once instead of waiting for the scheduler's turn. It is set with
SCHED_RESET_ON_FORK: a thread the loop starts later (the inference workers, each episode's
recorder) would otherwise inherit the policy and, busy for hundreds of milliseconds, starve
the rest of the cell, the loop's own helpers included."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

MAX_REALTIME_PRIORITY = 99  # Linux SCHED_FIFO priorities are 1..99


def lower_this_thread(nice: int, *, cell_id: str, what: str) -> None:
    """Add `nice` to the calling thread's niceness; a no-op where that is not possible."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as exc:
        log.debug("cell %s: could not lower %s's priority: %s", cell_id, what, exc)


def realtime_this_thread(priority: int, *, cell_id: str) -> bool:
    """Run the calling thread under SCHED_FIFO at `priority` (1..99), threads it starts from
    now on under the ordinary policy; False (and a warning saying how to allow it) where
    the OS refuses. Undo with `ordinary_this_thread`."""
    if not 1 <= priority <= MAX_REALTIME_PRIORITY:
        raise ValueError(f"realtime_priority must be in 1..{MAX_REALTIME_PRIORITY}, got {priority}")
    if not hasattr(os, "sched_setscheduler"):
        log.warning("cell %s: no real-time scheduling on this OS; the loop runs ordinary", cell_id)
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except OSError as exc:
        log.warning(
            "cell %s: the control loop could not take real-time priority %d (%s); it runs "
            "as an ordinary thread. Allow it with LimitRTPRIO=%d in the actor's systemd unit "
            "(ops/systemd/fleet-actor@.service) or CAP_SYS_NICE",
            cell_id,
            priority,
            exc.strerror or exc,
            priority,
        )
        return False
    log.info("cell %s: control loop runs SCHED_FIFO at priority %d", cell_id, priority)
    return True


def ordinary_this_thread() -> None:
    """Back to the ordinary policy (the thread may go on to other work)."""
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def realtime_allowed(priority: int) -> tuple[bool, str]:
    """Whether this process may run a thread under SCHED_FIFO at `priority`, tried on a
    short-lived thread of its own (for `fleet doctor`); the OS's reason when not."""
    result: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        except (OSError, AttributeError) as exc:
            result.append((False, str(getattr(exc, "strerror", None) or exc)))
        else:
            result.append((True, ""))

    thread = threading.Thread(target=probe, name="realtime-probe", daemon=True)
    thread.start()
    thread.join()
    return result[0]

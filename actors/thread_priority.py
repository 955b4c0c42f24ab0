"""Per-thread CPU priority on a cell computer.

Work beside the control loop (inference, fetching and loading versions) may take a core for
a while; on Linux such a thread lowers its own priority (a per-thread nice) so that, on a busy
cell computer, the control loop's thread always gets the core first."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


def lower_this_thread(nice: int, *, cell_id: str, what: str) -> None:
    """Add `nice` to the calling thread's niceness; a no-op where that is not possible."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as exc:
        log.debug("cell %s: could not lower %s's priority: %s", cell_id, what, exc)

"""A process `fleet up` starts stops when `fleet up` dies, however it dies.

Why: `fleet up` stops its children in order on Ctrl-C or SIGTERM, but a SIGKILL, a crash, or
a SIGINT it never sees (a shell starts background jobs with SIGINT ignored, and children
inherit that) would leave the learner, its Ray workers and every cell running with nobody
to stop them. Each child asks the kernel for SIGTERM when its parent exits (Linux
PR_SET_PDEATHSIG), and SIGTERM starts the child's own orderly stop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

SUPERVISOR_ENV = "FLEET_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def supervised_env() -> dict[str, str]:
    """The environment for a child that must not outlive this process."""
    return {**os.environ, SUPERVISOR_ENV: str(os.getpid())}


def stop_with_supervisor() -> bool:
    """In a child started with supervised_env(): get SIGTERM when the supervisor exits.

    Call it after installing the SIGTERM handler. When the supervisor is already gone, the
    SIGTERM comes at once. The variable is removed, so this process's own children (Ray
    workers, servo chains) are not tied to the supervisor. True when it applied.
    """
    value = os.environ.pop(SUPERVISOR_ENV, "")
    if not value.isdigit():
        return False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        except (OSError, AttributeError) as exc:
            log.warning("cannot tie this process to fleet up (pid %s): %s", value, exc)
            return False
    if os.getppid() != int(value):  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return True

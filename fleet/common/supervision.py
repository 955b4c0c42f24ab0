"""A process `fleet up` starts stops when `fleet up` dies, however it dies.

Why: `fleet up` stops its children in order on Ctrl-C or SIGTERM, but a SIGKILL, a crash, or
a SIGINT it never sees (a shell starts background jobs with SIGINT ignored, and children
inherit that) would leave the learner, its Ray workers and every cell running with nobody
to stop them. Each child asks the kernel for SIGTERM when its parent exits (Linux
PR_SET_PDEATHSIG), and SIGTERM starts the child's own orderly stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

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


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process the moment its parent dies.

    Ray runs it in each of the learner's workers (runtime_env worker_process_setup_hook):
    their parent is the raylet, which Ray itself ties to the learner, so a worker dies
    with its learner instead of noticing a lost socket seconds later.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def kill_group_when_gone() -> subprocess.Popen[bytes]:
    """Make this process lead its own process group and start a reaper that SIGKILLs the
    group, and every process that descends from this one, the moment it exits, however
    it exits.

    Why: Ray starts some of its processes (the dashboard and runtime-env agents, idle
    workers) from the raylet with no tie to the driver; some share the driver's process
    group, some lead their own. The reaper holds the read end of a pipe only this process
    writes to; the kernel closes the write end when this process dies, and the EOF wakes
    the reaper, which knows the descendants from a scan of /proc every half second.
    """
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)
    read_end, write_end = os.pipe()  # both close-on-exec: no child of ours inherits them
    reaper = subprocess.Popen(
        [sys.executable, "-m", "fleet.common.supervision", "reap", str(os.getpid()), str(read_end)],
        pass_fds=(read_end,),
        start_new_session=True,  # outside the group it kills, and away from terminal signals
        stdin=subprocess.DEVNULL,
    )
    os.close(read_end)
    _KEEP.append(write_end)
    return reaper


_KEEP: list[int] = []  # the reaper pipe's write end, open for the rest of this process's life
_SCAN_S = 0.1  # ~2 ms of CPU a scan at 100 processes: 2% of a core


def _processes() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (parent pid, process group, state, start time) of every process, from /proc."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()  # after "pid (comm) "
        out[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0], int(fields[19]))
    return out


def _descendants(root: int, procs: dict[int, tuple[int, int, str, int]]) -> set[tuple[int, int]]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add((child, procs[child][3]))
            todo.append(child)
    return found


def _reap(leader: int, fd: int) -> None:
    """Until EOF on `fd`, remember the leader's descendants; then SIGKILL them and its
    process group until none is left (zombies count as gone)."""
    import select

    known: set[tuple[int, int]] = set()
    while True:
        ready, _, _ = select.select([fd], [], [], _SCAN_S)
        if ready and not os.read(fd, 4096):
            break
        if not ready:
            me = os.getpid()  # a child of the leader too: never on the list it kills
            seen = _descendants(leader, _processes())
            known |= {(pid, start) for pid, start in seen if pid != me}
    deadline = time.monotonic() + 10.0
    killed: set[int] = set()
    while time.monotonic() < deadline:
        procs = _processes()
        left = [
            pid
            for pid, start in known
            if pid in procs and procs[pid][3] == start and procs[pid][2] != "Z"
        ]
        in_group = [p for p, (_, grp, state, _) in procs.items() if grp == leader and state != "Z"]
        if not left and not in_group:
            print(
                f"reaper: learner {leader} exited; {len(killed)} of its processes killed "
                f"({len(known)} seen)",
                file=sys.stderr,
                flush=True,
            )
            return
        killed.update(left, in_group)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader, signal.SIGKILL)
        time.sleep(0.02)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fleet.common.supervision",
        description="The learner's reaper (started by fleet learner, not by hand): waits for "
        "EOF on FD, then SIGKILLs process group GROUP and every process it saw descend "
        "from process GROUP.",
    )
    parser.add_argument("command", choices=["reap"])
    parser.add_argument("group", type=int, help="the learner's pid, leader of its group")
    parser.add_argument("fd", type=int, help="read end of the learner's pipe")
    args = parser.parse_args()
    _reap(args.group, args.fd)

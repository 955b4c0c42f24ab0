"""The learner's lease: its Ray workers act in its name only while the learner lives.

Why: a SIGKILLed learner cannot tell its Ray workers to stop, and Ray notices the death of
a driver only seconds later; in between an orphaned gateway would ack chunks and an
orphaned trainer would publish versions that no checkpoint holds. The learner process
holds an exclusive flock on a lease file for its whole life, and the kernel drops the lock
the instant the process dies, however it dies. A worker on the same machine probes the lock
(one non-blocking flock call) right before each ack and each publish, and once the lock is
free it refuses for good. The lock also keeps a second learner off the same data dir.

The probe sees only this machine's learner: workers on other nodes of a cluster rely on
Ray ending a dead driver's actors.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

LEASE_FILE = "learner.lease"


class LeaseHeld(RuntimeError):
    """Another live learner holds the lease on this data dir."""


def hold_lease(path: Path, *, timeout_s: float = 10.0) -> int:
    """Take the lease for the rest of this process's life; returns the fd (keep it open).

    Waits up to `timeout_s` for a dying learner's workers to let go of the file, then
    refuses: two learners must not write one store.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LeaseHeld(
                    f"{path} is held by another learner (pid {holder}): stop it first, "
                    "or give this one another --data-dir"
                ) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Lease:
    """A worker's view of the learner's lease: alive() is True while the learner lives.

    Once it has seen the learner gone it stays False (a new learner is a new lease).
    Picklable by path, so a Ray actor can be handed one.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._gone = False
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[type[Lease], tuple[str]]:
        return (Lease, (str(self.path),))

    def alive(self) -> bool:
        if self._gone:
            return False
        with self._lock:
            if self._gone:
                return False
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # the learner holds it
            # Free: the learner has died. Let go at once, so a new learner can take it.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            self._gone = True
        log.error("the learner holding %s is gone: nothing more leaves in its name", self.path)
        return False

"""The learner's lease: alive while the holding process lives, gone the instant it is
killed, and never held by two learners at once."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.lease import Lease, LeaseHeld, hold_lease

HOLDER = """
import sys, time
from pathlib import Path
from fleet.lease import hold_lease
hold_lease(Path(sys.argv[1]))
print("HELD", flush=True)
time.sleep(600)
"""


def test_lease_lives_and_dies_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "learner.lease"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
        # A worker's copy travels by pickle (Ray) and probes the same file.
        lease = pickle.loads(pickle.dumps(Lease(path)))
        assert lease.alive() and lease.alive()
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            hold_lease(path, timeout_s=0.2)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert not lease.alive()
        assert not lease.alive(), "once gone, a lease stays gone"
        # The probe let go of the file: the next learner takes the lease at once.
        fd = hold_lease(path, timeout_s=1.0)
        try:
            assert Lease(path).alive(), "the new holder is alive to new probes"
            assert not lease.alive(), "an old probe does not come back to life"
        finally:
            os.close(fd)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)

"""Whatever way `fleet up` dies, the processes it started stop (no orphaned fleet)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.waiting import wait_for

# A child as fleet up's children are: its SIGTERM handler is its orderly stop.
CHILD = """
import os, signal, sys, time
from pathlib import Path
from fleet.common.supervision import SUPERVISOR_ENV, stop_with_supervisor
out = Path(sys.argv[1])
def stop(*_):
    out.joinpath("stopped").write_text("SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
applied = stop_with_supervisor()
# written whole, then renamed: the test waits for the file and then reads it
out.joinpath("ready.part").write_text(f"{applied} {SUPERVISOR_ENV in os.environ}")
os.replace(out / "ready.part", out / "ready")
time.sleep(60)
"""

# fleet up's own spawn path (fleet/control/up.py _Fleet.spawn), then nothing: it is killed.
SUPERVISOR = """
import sys, time
from pathlib import Path
from fleet.control.up import _Fleet
out = Path(sys.argv[1])
child = _Fleet(out).spawn("child", [sys.executable, "-c", sys.argv[2], str(out)])
out.joinpath("child.pid").write_text(str(child.proc.pid))
time.sleep(60)
"""


def test_fleet_up_children_stop_when_it_is_killed(tmp_path: Path) -> None:
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path), CHILD])
    try:
        wait_for(lambda: _written(tmp_path / "ready"), 30, "the child to start")
        # Tied to fleet up, and its own children are not (the variable is consumed).
        assert (tmp_path / "ready").read_text() == "True False"
        child_pid = int((tmp_path / "child.pid").read_text())
        sup.send_signal(signal.SIGKILL)  # no cleanup code of fleet up runs
        sup.wait(10)
        wait_for((tmp_path / "stopped").exists, 10, "the orphaned child's SIGTERM")
        wait_for(lambda: not _alive(child_pid), 10, "the orphaned child to exit")
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait(10)


def test_a_process_not_started_by_fleet_up_is_untouched(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLEET_SUPERVISOR_PID"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env)
    try:
        wait_for(lambda: _written(tmp_path / "ready"), 30, "the child to start")
        assert (tmp_path / "ready").read_text() == "False False"
    finally:
        child.kill()
        child.wait(10)


def _written(path: Path) -> bool:
    """The file exists and has its text: write_text creates it empty first."""
    return path.exists() and path.read_text() != ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it has exited, its parent (init) has yet to reap it.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"

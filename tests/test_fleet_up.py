"""End to end: `fleet up` runs sim cells through the whole learning loop and loses nothing.

sim cell -> edge actor -> gRPC -> learner on Ray -> zarr -> RLlib training -> new version
-> back to every cell. Counts are checked from the summary `fleet up` writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

# A bound that says "the cell follows the versions", not a speed target: every cell must run
# each version before shutdown, and a version taking longer than this to arrive is a stuck
# watch, not a slow machine (publication-to-running time is tests/bench/distribution.py's).
ADOPTION_LIMIT_S = 30.0
# Two versions must come out of the 75 s run: on a loaded 2-core machine the trainer makes
# about 100 updates in it after its first episode of every task (the action scale waits).
PUBLISH_EVERY = 40
RUN_MARKER = "FLEET_TEST_RUN"
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("fleet")
    summary_path = run_dir / "summary.json"
    # Leftovers are looked for in our own process tree only (other work on a shared machine
    # starts Redis and Ray too): while `fleet up` runs, this process is a child subreaper, so
    # whatever of its tree is orphaned (Ray's daemons detach) is reparented here, not to init;
    # and every process of this run inherits the marker.
    marker = f"{os.getpid()}-{run_dir.name}"
    _child_subreaper(True)
    try:
        proc, cmdlines = _run_fleet_up(run_dir, summary_path, marker)
        leftovers = [
            p.cmdline() for p in psutil.Process().children(recursive=True) if _is_ours(p, marker)
        ]
    finally:
        _child_subreaper(False)
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in (run_dir / "run" / "logs").glob("*.log")
    )
    assert proc.returncode == 0, f"fleet up failed:\n{proc.stdout}\n{proc.stderr}\n{logs}"
    summary = json.loads(summary_path.read_text())
    return {
        "summary": summary,
        "leftovers": leftovers,
        "logs": logs,
        "run_dir": run_dir,
        "stdout": proc.stdout,
        "cmdlines": cmdlines,
    }


def _child_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _run_fleet_up(
    run_dir: Path, summary_path: Path, marker: str
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run `fleet up` to its end; also every command line its process tree showed meanwhile
    (sampled while it ran: what any local user could read with ps)."""
    out, err = run_dir / "up.stdout", run_dir / "up.stderr"
    argv = [
        sys.executable,
        "-m",
        "fleet.cli",
        "up",
        "--cells",
        "2",
        "--duration",
        "75",
        "--publish-every",
        str(PUBLISH_EVERY),
        "--min-steps",
        "100",
        "--preset",
        "tiny",  # the suite's model: versions come out within the 75 s run
        "--first-version-demos",
        "0",  # and no 100 opening demonstrations a task first
        "--lr",
        "0.0005",
        "--batch-size",
        "16",
        "--no-live",
        "--rollout",
        "immediate",
        "--data-dir",
        str(run_dir / "run"),
        "--summary-json",
        str(summary_path),
    ]
    cmdlines: list[list[str]] = []
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            argv,
            stdout=stdout,
            stderr=stderr,
            text=True,
            env={**os.environ, "COLUMNS": "200", RUN_MARKER: marker},
        )
        deadline = time.monotonic() + 420
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("fleet up ran past 420 s")
            for p in psutil.Process().children(recursive=True):
                if _is_ours(p, marker):
                    with contextlib.suppress(psutil.Error):
                        cmdlines.append(p.cmdline())
            time.sleep(0.5)
    done = subprocess.CompletedProcess(argv, proc.returncode, out.read_text(), err.read_text())
    return done, cmdlines


def _is_ours(p: psutil.Process, marker: str) -> bool:
    try:
        return p.environ().get(RUN_MARKER) == marker
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def test_store_holds_exactly_the_steps_the_cells_sent(fleet_run: dict) -> None:
    s = fleet_run["summary"]
    cells = s["cells"]
    assert set(cells) == {"cell-01", "cell-02"}
    for cell_id, c in cells.items():
        assert c["summary_written"], f"{cell_id} wrote no summary"
        assert c["episodes"] >= 3, f"{cell_id} finished only {c['episodes']} episodes"
        assert c["dropped"] == 0
    sent = sum(c["steps_sent"] for c in cells.values())
    assert sent > 0
    assert s["store"]["steps"] == sent, fleet_run["logs"]
    # Every finished episode, and each one cut short (by the stop, or a fault), is stored once.
    stored = sum(c["episodes"] + c["episodes_aborted"] for c in cells.values())
    assert s["store"]["episodes"] == stored
    assert all(c["episodes_aborted"] >= 1 for c in cells.values())  # the one the stop cut short


def test_versions_are_published_and_every_cell_adopts_each_promptly(fleet_run: dict) -> None:
    """Every cell follows the versions: within ADOPTION_LIMIT_S of each publication it runs
    that version or a newer one (a version superseded before a cell fetched it may be
    skipped: the cell goes straight to the newest, as it should)."""
    s = fleet_run["summary"]
    published = s["versions_published"]
    assert len(published) >= 2, f"only {published} published after {s['updates']} updates"
    assert s["updates"] >= PUBLISH_EVERY * len(published)
    order = sorted(published, key=lambda v: s["published_at"][v])
    last_published = s["published_at"][order[-1]]
    for cell_id, c in s["cells"].items():
        assert c["versions_adopted"] == [a["version"] for a in c["adoptions"]]
        assert c["adoptions"], f"{cell_id} never ran a version"
        for i, version in enumerate(order[:-1]):  # the newest may land during shutdown
            published_at = s["published_at"][version]
            if last_published - published_at < ADOPTION_LIMIT_S and not any(
                a["version"] in order[i:] for a in c["adoptions"]
            ):
                continue  # published too close to the end to judge
            caught_up = [
                a["adopted_at"] - published_at
                for a in c["adoptions"]
                if a["version"] in order[i:] and a["adopted_at"] >= published_at
            ]
            assert caught_up, f"{cell_id} never ran {version} or newer: {c['adoptions']}"
            delay = min(caught_up)
            assert delay <= ADOPTION_LIMIT_S, f"{cell_id} took {delay:.1f}s to run {version}+"


def test_no_command_line_shows_the_redis_password(fleet_run: dict) -> None:
    """Any local user can read a process's argv (ps): the password `fleet up` gave its Redis
    reaches the learner and the dashboard through their environment, never their argv."""
    details = json.loads((fleet_run["run_dir"] / "run" / "connection.json").read_text())
    password = details["redis_url"].split("//:", 1)[1].split("@", 1)[0]
    assert len(password) >= 16
    seen = fleet_run["cmdlines"]
    assert any("learner.main" in " ".join(c) for c in seen), "never saw the learner running"
    assert any("dashboard" in c for c in seen), "never saw the dashboard running"
    leaks = [c for c in seen if any(password in part for part in c)]
    assert not leaks, leaks[:3]


def test_training_settings_reach_the_learner(fleet_run: dict) -> None:
    """`fleet up --lr/--batch-size/--first-version-demos` are the learner's: a lab tunes
    learning from one command; MuJoCo cells' targets past a success hold by default."""
    learners = [c for c in fleet_run["cmdlines"] if "learner.main" in " ".join(c)]
    assert learners, "never saw the learner running"
    for argv in learners:
        assert argv[argv.index("--lr") + 1] == "0.0005"
        assert argv[argv.index("--batch-size") + 1] == "16"
        assert argv[argv.index("--first-version-demos") + 1] == "0"
        assert "--hold-after-success" in argv


def test_connection_details_are_written_owner_only_and_announced(fleet_run: dict) -> None:
    """`fleet status --run DIR` and the rollout commands need the Redis URL (and password)
    of a running fleet: `fleet up` writes them into the run directory, 0600, and says where."""
    path = Path(fleet_run["run_dir"]) / "run" / "connection.json"
    assert path.stat().st_mode & 0o777 == 0o600
    details = json.loads(path.read_text())
    assert details["redis_url"].startswith("redis://:") and "@127.0.0.1:" in details["redis_url"]
    assert details["learner"].startswith("127.0.0.1:") and details["operator_token"]
    assert str(path) in fleet_run["stdout"].replace("\n", "")


def test_nothing_is_left_running(fleet_run: dict) -> None:
    assert fleet_run["leftovers"] == []


def test_episodes_are_in_zarr_layout(fleet_run: dict) -> None:
    store = Path(fleet_run["run_dir"]) / "run" / "store"
    cells = sorted(p.name for p in (store / "episodes").iterdir() if p.is_dir())
    assert cells == ["cell-01", "cell-02"]
    some_episode = next(p for p in (store / "episodes" / "cell-01").iterdir() if p.is_dir())
    names = {p.name for p in some_episode.iterdir()}
    steps = {"joint_pos", "action", "intervention", "reward", "timestamp"}
    assert steps | {"cameras", "zarr.json"} <= names
    assert {p.name for p in (some_episode / "cameras").iterdir()} >= {"overhead", "front"}

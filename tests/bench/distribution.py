"""Signed policy distribution to a fleet: publication to all cells running a ~100 MB version.

One learner PolicyServicer (real gRPC on loopback, real Redis registry, the real Publisher
signing with Ed25519) in this process, and N cells (default 16), each a real PolicyWatcher
with the learner's public key and its own on-disk version cache.

Every cell is its own OS process (`--cell-procs`, default one per cell): a real cell is a
process on its own computer, with its own interpreter, GIL and gRPC channel. Cells as threads
of one process (the earlier layout) contend for one GIL, which no fleet does, so that
measured Python's lock rather than distribution; `--cell-procs K` (< N-1) packs cells
1..N-1 into K processes to show the difference. Cell 0 runs its watcher beside a real
ControlLoop on the simulated cell at 20 Hz on the wall clock, which adopts a new version at
its next chunk boundary; there tick lateness during the swap is measured. Cells 1..N-1 adopt
a new runner as soon as it is ready (polled every 5 ms). Cells 1..N-1 and the learner run
at nice 10, so cell 0's loop keeps the core its own computer would give it (see NICE_OTHERS).

Two publications of ~100 MB versions, same run:
1. one cell alone: a version pinned to cell 0 while every other cell idles; publication (the
   pin) -> cell 0 runs it. What one cell on its own takes: the floor for the fleet figure.
2. the fleet: a version published as stable for all N cells at once.

Figures (goals from issue 6):
- publication -> every cell has the new version verified and loaded ("ready"), and ->
  every cell runs it ("running"; cell 0 at its next chunk boundary). Goal: running <= 2 s.
- the learner's weight bytes sent for the version against model size x cells (goal: equal:
  each cell fetches once) and how often it read the file from disk (goal: 1).
- cell 0's control loop during the fleet swap: late ticks (more than one period behind;
  goal 0) and how late the latest tick started (max, p99).
- CPU: each cell process's CPU seconds from receiving the assignment to running the version
  (receive + sha256 + signature + load + warm-up; the cache write comes after), the
  learner's CPU seconds while serving the fleet, and their sum over this machine's cores:
  a lower bound on the fleet figure here, which a real fleet (a computer per cell) does not
  have. `cpus` in the output says how many cores this machine has.

Prints a few lines, and as its LAST line one JSON object with figures and goals.
Run: .venv/bin/python tests/bench/distribution.py [--cells 16] [--layers 5] [--cell-procs K]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import torch

from actors.config import ActorConfig
from actors.control_loop import ControlLoop
from actors.policy_watch import PolicyWatcher
from actors.version_cache import VersionCache
from drivers.sim import make_sim_cell
from fleet import signing
from fleet.policy.config import policy_config
from fleet.policy.model import UnifiedPolicy
from fleet.redis_server import RedisServer
from fleet.registry import Registry
from learner import policy_service
from learner.policy_service import PolicyServicer
from learner.publisher import Publisher

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("pick_cube", "touch_target")
CAMERAS = ("overhead", "front")
GOAL_RUNNING_S = 2.0
GOAL_LATE_TICKS = 0
# Cells 1..N-1 and the learner share this machine with cell 0, which no real cell computer
# does: at this CPU priority they leave cell 0's control loop (nice 0) the core it would have
# to itself, and compete with cell 0's watcher (itself niced by PolicyWatcher) as equals.
NICE_OTHERS = 10


class _Uplink:
    def submit(self, chunk: Any) -> bool:
        return True


class WallPacedSimClock:
    """The sim cell on the wall clock: `now()` is wall time, and each `sleep_until` steps the
    physics by the tick's length and then sleeps to the wall deadline. (The sim's own clock
    runs on sim time, so a loop on it could never be late.) Notes by how much each tick
    overran its deadline."""

    def __init__(self, sim_clock: Any) -> None:
        self.world = sim_clock.world
        self.t0 = time.monotonic()
        self._last: float | None = None
        self.ticks: list[tuple[float, float, bool]] = []  # (wall time, lateness s, late?)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sleep_until(self, t: float) -> None:
        dt = 0.0 if self._last is None else max(0.0, t - self._last)
        self._last = t
        n = self.world.steps_until(self.world.time + dt)
        if n:
            self.world.step(n)
        wait = t - self.now()
        if wait > 0:
            time.sleep(wait)
        # How late the next tick starts; "late" as the loop counts it: a period or more.
        lateness = max(0.0, self.now() - t)
        self.ticks.append((time.time(), lateness, dt > 0 and lateness > dt))


def big_model(layers: int, seed: int) -> UnifiedPolicy:
    """~100 MB of float32 weights (layers=5: 106 MB) that still infers in ~25 ms on a core:
    the tiny preset's vision stem with a wide transformer."""
    torch.manual_seed(seed)
    return UnifiedPolicy(
        policy_config("tiny", TASKS, CAMERAS, d_model=512, n_heads=8, ff_dim=4096, n_layers=layers)
    )


def wait_until(predicate: Any, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.01)  # the figures are the cells' own timestamps, not this poll's
    return None


# -- cells: subprocesses ------------------------------------------------------------------


_EMIT_LOCK = threading.Lock()


def _emit(cell: int, event: str, version: str) -> None:
    """One line to the parent: what happened to which cell, at what wall time, and this
    process's CPU seconds so far (all its threads, gRPC's included). One write under a lock:
    print() from several threads can interleave a line with another's newline."""
    line = json.dumps(
        {
            "cell": cell,
            "event": event,
            "version": version,
            "t": time.time(),
            "cpu": time.process_time(),
        }
    )
    with _EMIT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _watcher(args: argparse.Namespace, cell: int, faults: list[str]) -> PolicyWatcher:
    cell_id = f"cell-{cell:02d}"
    return PolicyWatcher(
        args.address,
        cell_id,
        deadline_s=30.0,
        on_fault=faults.append,
        verify_key=signing.load_public_key(Path(args.verify_key)),
        cache=None
        if args.no_cache
        else VersionCache(Path(args.cache) / f"{cell:02d}", cell_id=cell_id),
    )


def _watch_events(
    cell: int,
    watcher: PolicyWatcher,
    running: Any,
    stop: threading.Event,
    adopt: Any = None,
) -> None:
    """Emits "assigned", "ready" (verified and loaded) and "running" as they change, calling
    `adopt()` first where this thread also adopts new runners. Polled every 5 ms, one thread
    per cell: a cell process's own CPU figure includes this, so it polls gently."""
    seen = {"assigned": "", "ready": "", "running": ""}
    while not stop.is_set():
        if adopt is not None:
            adopt()
        now = {
            "assigned": watcher.current_assignment,
            "ready": watcher.loaded_version,
            "running": running(),
        }
        for event in ("assigned", "ready", "running"):
            if now[event] != seen[event]:
                seen[event] = now[event]
                _emit(cell, event, now[event])
        time.sleep(0.005)


def run_cell0(args: argparse.Namespace) -> int:
    """Runs until stdin says "stop T0 T1" (wall times), then prints the ticks of that window."""
    torch.set_num_threads(1)
    faults: list[str] = []
    watcher = _watcher(args, 0, faults)
    sim = make_sim_cell(
        "cell-00",
        seed=0,
        cameras=CAMERAS,
        height=48,
        width=64,
        control_hz=args.hz,
        realtime_factor=1.0,
        takeover_prob=0.0,
    )
    clock = WallPacedSimClock(sim.clock)
    loop = ControlLoop(
        ActorConfig(
            cell_id="cell-00", learner_address=args.address, control_hz=args.hz, max_episode_s=30.0
        ),
        sim.hardware,
        sim.scene,
        sim.operator,
        clock,
        _Uplink(),
        watcher,
    )
    stop = threading.Event()
    watcher.start()
    threads = [
        threading.Thread(target=loop.run, args=(stop,), name="control-loop"),
        threading.Thread(
            target=_watch_events,
            args=(0, watcher, lambda: loop.stats["version_running"], stop),
            name="report",
        ),
    ]
    for t in threads:
        t.start()
    line = sys.stdin.readline().split()
    stop.set()
    for t in threads:
        t.join(30)
    watcher.stop()
    t0, t1 = (float(line[1]), float(line[2])) if len(line) == 3 else (0.0, float("inf"))
    ticks = [(lat, late) for t, lat, late in clock.ticks if t0 <= t <= t1]
    print(
        json.dumps(
            {
                "ticks": len(ticks),
                "late_ticks": sum(late for _, late in ticks),
                "max_lateness_ms": round(1000 * max((lat for lat, _ in ticks), default=0.0), 2),
                "p99_lateness_ms": round(
                    1000 * sorted(lat for lat, _ in ticks)[int(0.99 * (len(ticks) - 1))], 2
                )
                if ticks
                else 0.0,
                "loop_late_ticks_total": loop.stats["late_ticks"],
                "late_tick_times": [round(t, 3) for t, _, late in clock.ticks if late],
                "adoptions": loop.stats["versions_adopted"],
                "faults": faults,
            }
        ),
        flush=True,
    )
    return 0


def run_cell_group(args: argparse.Namespace) -> int:
    """Cells `args.group` (comma-separated numbers) in this process, each adopting a new
    runner as soon as its watcher has one; runs until a line on stdin."""
    torch.set_num_threads(1)  # one core's worth per cell, as on a cell computer
    os.nice(NICE_OTHERS)
    faults: list[str] = []
    cells = [int(c) for c in args.group.split(",")]
    watchers = {c: _watcher(args, c, faults) for c in cells}
    running = dict.fromkeys(cells, "")
    stop = threading.Event()

    def adopt(c: int) -> None:
        runner = watchers[c].take_new()
        if runner is not None:
            running[c] = runner.version_id

    threads = []
    for c, w in watchers.items():
        w.start()
        threads.append(
            threading.Thread(
                target=_watch_events,
                args=(c, w, lambda c=c: running[c], stop, lambda c=c: adopt(c)),
                name=f"cell-{c}",
            )
        )
    for t in threads:
        t.start()
    sys.stdin.readline()
    stop.set()
    for t in threads:
        t.join(30)
    for w in watchers.values():
        w.stop()
    print(json.dumps({"group": cells, "faults": faults}), flush=True)
    return 0


# -- the learner, and the run ------------------------------------------------------------


class Fleet:
    """The cell processes and what they report: events[(cell, event, version)] = (t, cpu)."""

    def __init__(self, args: argparse.Namespace, address: str, public: Path, cache: Path):
        self.cells = args.cells
        others = list(range(1, args.cells))
        procs = max(1, min(args.cell_procs or len(others), len(others))) if others else 0
        self.groups = [others[i::procs] for i in range(procs)]
        common = ["--address", address, "--verify-key", str(public), "--cache", str(cache)]
        common += ["--hz", str(args.hz), *(["--no-cache"] if args.no_cache else [])]
        script = str(Path(__file__).resolve())
        self.procs: list[subprocess.Popen[str]] = []
        self.proc_cells: list[list[int]] = [[0], *self.groups]
        for extra in (["--cell0"], *(["--group", ",".join(map(str, g))] for g in self.groups)):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, script, *extra, *common],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=str(ROOT),
                )
            )
        self.events: dict[tuple[int, str, str], tuple[float, float]] = {}
        self.finals: list[dict[str, Any]] = []
        self._readers = [
            threading.Thread(target=self._read, args=(p,), daemon=True) for p in self.procs
        ]
        for t in self._readers:
            t.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            msg = json.loads(raw)
            if "event" in msg:
                self.events[(msg["cell"], msg["event"], msg["version"])] = (msg["t"], msg["cpu"])
            else:
                self.finals.append(msg)

    def wait(
        self, event: str, version: str, cells: list[int], timeout_s: float, *, since: float = 0.0
    ) -> bool:
        """True once every cell in `cells` has reported `event` for `version` after `since`."""
        return (
            wait_until(
                lambda: all(
                    self.events.get((c, event, version), (-1.0, 0.0))[0] >= since for c in cells
                ),
                timeout_s,
            )
            is not None
        )

    def at(self, cell: int, event: str, version: str) -> tuple[float, float]:
        return self.events[(cell, event, version)]

    def swap_cpu(self, version: str) -> list[tuple[list[int], float]]:
        """Per cell process: its CPU seconds from its first cell's assignment to its last
        cell's running `version`, per cell it holds."""
        out = []
        for cells in self.proc_cells:
            start = min(self.at(c, "assigned", version)[1] for c in cells)
            end = max(self.at(c, "running", version)[1] for c in cells)
            out.append((cells, (end - start) / len(cells)))
        return out

    def stop(self, window: tuple[float, float]) -> dict[str, Any]:
        """Stops every cell process; cell 0's tick figures over `window`."""
        for i, proc in enumerate(self.procs):
            assert proc.stdin is not None
            proc.stdin.write(f"stop {window[0]} {window[1]}\n" if i == 0 else "stop\n")
            proc.stdin.flush()
        for proc in self.procs:
            proc.wait(60)
        for t in self._readers:
            t.join(10)
        return next(m for m in self.finals if "ticks" in m)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _lower_priority_of_this_process(nice: int) -> None:
    """Every thread of this process (Linux nice is per thread; threads started later inherit
    it from the thread that starts them)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def _r(x: float) -> float:
    return round(x, 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=16)
    p.add_argument("--layers", type=int, default=5, help="transformer layers of the big model")
    p.add_argument("--hz", type=float, default=20.0, help="cell 0's control rate")
    p.add_argument("--no-cache", action="store_true", help="cells keep no disk cache")
    p.add_argument(
        "--cell-procs",
        type=int,
        default=0,
        help="processes for cells 1..N-1 (default: one per cell, as a real fleet)",
    )
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--cell0", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--group", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--verify-key", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.cell0:
        return run_cell0(args)
    if args.group:
        return run_cell_group(args)
    torch.set_num_threads(1)

    with RedisServer() as redis, tempfile.TemporaryDirectory(prefix="dist-bench-") as tmp:
        root = Path(tmp)
        registry = Registry(redis.url, prefix="bench:")
        private, public = signing.write_key_pair(root / "keys")
        servicer = PolicyServicer(registry)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4 * args.cells + 16),
            options=[  # as learner/gateway.py: the cells' keepalive pings are welcome
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ],
        )
        policy_service.add_to_server(server, servicer)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        publisher = Publisher(registry, root / "versions", signing_key=private)
        torch.manual_seed(0)
        first = publisher.publish(
            UnifiedPolicy(policy_config("tiny", TASKS, CAMERAS)), training_step=0, data_seen=0
        )
        all_cells = list(range(args.cells))
        fleet = Fleet(args, address, public, root / "cells")
        _lower_priority_of_this_process(NICE_OTHERS)  # the learner (cell 0 started at 0)
        figures: dict[str, Any] = {}
        try:
            if not fleet.wait("running", first.version_id, all_cells, args.timeout):
                missing = [
                    c for c in all_cells if (c, "running", first.version_id) not in fleet.events
                ]
                raise RuntimeError(f"cells {missing} never ran the first version")
            time.sleep(1.0)  # cell 0's loop settles at its rate

            # 1. One cell alone: a big version pinned to cell 0, the others idle.
            solo_pub = Publisher(
                registry, root / "versions", signing_key=private, rollout_mode="auto"
            )
            solo = solo_pub.publish(big_model(args.layers, seed=2), training_step=1, data_seen=1)
            t_solo = time.time()
            registry.set_pin("cell-00", solo.version_id, actor="bench", reason="one cell alone")
            if not fleet.wait("running", solo.version_id, [0], args.timeout):
                raise RuntimeError(f"cell 0 never ran {solo.version_id}")
            solo_running = fleet.at(0, "running", solo.version_id)[0] - t_solo
            solo_ready = fleet.at(0, "ready", solo.version_id)[0] - t_solo
            solo_cpu = (
                fleet.at(0, "running", solo.version_id)[1]
                - fleet.at(0, "assigned", solo.version_id)[1]
            )
            t_unpin = time.time()
            registry.clear_pin("cell-00", actor="bench", reason="back to the fleet")
            if not fleet.wait("running", first.version_id, [0], args.timeout, since=t_unpin):
                raise RuntimeError("cell 0 never went back to the first version")
            time.sleep(2.0)  # its cache write of the solo version is done, the loop settled

            # 2. The fleet: a big version published as stable for every cell at once.
            model = big_model(args.layers, seed=1)
            t0 = time.time()
            manifest = publisher.publish(model, training_step=2, data_seen=2)
            t_published = time.time()
            cpu_published = time.process_time()
            version = manifest.version_id
            size = Path(registry.version(version)["weights_path"]).stat().st_size
            ok_ready = fleet.wait("ready", version, all_cells, args.timeout)
            ok_running = fleet.wait("running", version, all_cells, args.timeout)
            if not (ok_ready and ok_running):
                raise RuntimeError(f"not every cell took {version}")
            learner_cpu = time.process_time() - cpu_published
            per_cell = [fleet.at(c, "running", version)[0] - t_published for c in all_cells]
            per_ready = [fleet.at(c, "ready", version)[0] - t_published for c in all_cells]
            swap_cpu = fleet.swap_cpu(version)
            others_cpu = [cpu for cells, cpu in swap_cpu if 0 not in cells]
            cell0_cpu = next(cpu for cells, cpu in swap_cpu if 0 in cells)
            cells_cpu_total = sum(cpu * len(cells) for cells, cpu in swap_cpu)
            time.sleep(1.0)  # and a second of running the new version
            ticks = fleet.stop((t0, time.time()))
            sent = servicer.bytes_sent[version]
            cpus = os.cpu_count() or 1
            faults = [f for m in fleet.finals for f in m.get("faults", [])]
            figures = {
                "cells": args.cells,
                "cell_processes": len(fleet.procs),
                "cpus": cpus,
                "model_bytes": size,
                "parameters": manifest.parameter_count,
                "one_cell_alone": {
                    "cell": "cell-00",
                    "publication_to_ready_s": _r(solo_ready),
                    "publication_to_running_s": _r(solo_running),
                    "swap_cpu_s": _r(solo_cpu),
                    "late_ticks": sum(t_solo <= t <= t_unpin for t in ticks["late_tick_times"]),
                },
                "publish_s": _r(t_published - t0),
                "publication_to_all_ready_s": _r(max(per_ready)),
                "publication_to_all_running_s": _r(max(per_cell)),
                "goal_running_s": GOAL_RUNNING_S,
                "running_goal_met": max(per_cell) <= GOAL_RUNNING_S,
                "cell_running_s": {
                    "min": _r(min(per_cell)),
                    "median": _r(statistics.median(per_cell)),
                    "max": _r(max(per_cell)),
                    "cell_0_with_loop": _r(per_cell[0]),
                },
                "cell_swap_cpu_s": {
                    "min": _r(min(others_cpu, default=0.0)),
                    "median": _r(statistics.median(others_cpu) if others_cpu else 0.0),
                    "max": _r(max(others_cpu, default=0.0)),
                    "cell_0_with_loop": _r(cell0_cpu),
                },
                "learner_cpu_s": _r(learner_cpu),
                "total_cpu_s": _r(cells_cpu_total + learner_cpu),
                "cpu_bound_s": _r((cells_cpu_total + learner_cpu) / cpus),
                "learner_bytes_sent": sent,
                "model_bytes_x_cells": size * args.cells,
                "bytes_sent_ratio": round(sent / (size * args.cells), 4),
                "learner_disk_reads": servicer.disk_reads[version],
                "late_ticks_during_swap": ticks["late_ticks"],
                "goal_late_ticks": GOAL_LATE_TICKS,
                "late_ticks_goal_met": ticks["late_ticks"] <= GOAL_LATE_TICKS,
                "ticks_during_swap": ticks["ticks"],
                "max_tick_lateness_ms": ticks["max_lateness_ms"],
                "p99_tick_lateness_ms": ticks["p99_lateness_ms"],
                "tick_period_ms": round(1000 / args.hz, 2),
                "late_ticks_at_s": [
                    round(t - t_published, 3) for t in ticks["late_tick_times"] if t >= t0
                ],
                "signature_checked": True,
                "cache": not args.no_cache,
                "faults": len(faults),
            }
        finally:
            fleet.kill()
            servicer.stop()
            server.stop(0).wait(5)
            registry.close()
    solo_fig = figures["one_cell_alone"]
    print(
        f"one cell alone: publication to running a {figures['model_bytes'] / 1e6:.1f} MB "
        f"version in {solo_fig['publication_to_running_s']} s "
        f"({solo_fig['swap_cpu_s']} CPU s)"
    )
    print(
        f"{figures['cells']} cells in {figures['cell_processes']} processes on "
        f"{figures['cpus']} cpus: publish {figures['publish_s']} s, then every cell running it "
        f"in {figures['publication_to_all_running_s']} s (goal <= {GOAL_RUNNING_S} s)"
    )
    print(
        f"CPU for the swap: median {figures['cell_swap_cpu_s']['median']} s per cell, learner "
        f"{figures['learner_cpu_s']} s, total {figures['total_cpu_s']} s = "
        f"{figures['cpu_bound_s']} s on {figures['cpus']} cpus at best"
    )
    print(
        f"learner sent {figures['learner_bytes_sent'] / 1e6:.1f} MB = "
        f"{figures['bytes_sent_ratio']} x model size x cells; read the file "
        f"{figures['learner_disk_reads']} time(s)"
    )
    print(
        f"cell 0's control loop during the swap: {figures['late_ticks_during_swap']} late "
        f"ticks of {figures['ticks_during_swap']}, tick lateness max "
        f"{figures['max_tick_lateness_ms']} ms, p99 {figures['p99_tick_lateness_ms']} ms "
        f"(period {figures['tick_period_ms']} ms)"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

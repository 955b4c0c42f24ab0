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

Four ~100 MB versions, same run, after 3 s of cell 0's ticks with nothing going on (the
quiet floor of its tick lateness):
1. one cell alone, cold: a version pinned to cell 0 while every other cell idles;
   publication (the pin) -> cell 0 runs it, fetched on assignment (no prefetch).
2. one cell alone, prefetched: the other cells pinned (the rollout moves no pinned cell, so
   they prefetch nothing), a candidate in canary on one of them: cell 0 prefetches it (capped
   at --prefetch-mbps, low priority, verified, cached, loaded ahead); then the promotion.
   Cell 0's ticks from the candidate to a second after it runs it are the tick figures.
3. the fleet, prefetched: a candidate in canary on cell 1; the other cells prefetch it;
   then the promotion -> every cell running it.
4. the fleet, cold: a version published as stable for all N cells at once (as before
   prefetch; issue 6's figures).

Floors measured in the same run: the swap CPU floor (one SHA-256 over the version's bytes
plus one copy of them, in this process: what a cell taking a version it holds must at least
spend), cell 0's quiet tick lateness, and the one-cell prefetched promotion time (the floor
for the fleet's). Goals (issue 14 item 3), on the prefetched path: promotion -> all cells
running <= 1 s; a cell's swap CPU <= 2 x the floor; learner bytes sent per version <= 1.0 x
size x cells; on cell 0 alone while it prefetches and swaps, 0 late ticks (more than one
period behind) and tick lateness p99 <= 2 ms. `met` says which hold. The cold path keeps its
figures (per cell CPU from assignment to running: receive + sha256 + signature + load +
warm-up; the learner's CPU; their sum over this machine's cores, a bound a real fleet with a
computer per cell does not have).

Prints a few lines, and as its LAST line one JSON object with figures and goals.
Run: .venv/bin/python tests/bench/distribution.py [--cells 16] [--layers 5] [--cell-procs K]
     [--prefetch-mbps 25]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
from actors.thread_priority import realtime_this_thread
from actors.version_cache import VersionCache
from drivers.sim import make_sim_cell
from fleet.common import signing
from fleet.common.policy.config import policy_config
from fleet.common.policy.model import UnifiedPolicy
from fleet.control.redis_server import RedisServer
from fleet.control.registry import Registry
from learner import policy_service
from learner.policy_service import PolicyServicer
from learner.publisher import Publisher

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("pick_cube", "touch_target")
CAMERAS = ("overhead", "front")
# Goals (issue 14 item 3), for the prefetched path.
GOAL_PROMOTION_S = 1.0  # promotion -> every cell running it
GOAL_SWAP_CPU_RATIO = 2.0  # a cell's swap CPU over the floor (sha256 + one copy)
GOAL_BYTES_RATIO = 1.0  # learner bytes sent for a version over size x cells
GOAL_LATE_TICKS = 0  # on cell 0 while it prefetches and swaps, one cell alone
GOAL_P99_MS = 2.0  # tick lateness p99 there
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
        prefetch_bytes_per_s=args.prefetch_mbps * 1e6,
    )


def _watch_events(
    cell: int,
    watcher: PolicyWatcher,
    running: Any,
    stop: threading.Event,
    adopt: Any = None,
) -> None:
    """Emits "assigned", "ready" (verified and loaded), "running" and "prefetched" (the
    newest version fetched, verified and cached ahead) as they change, calling `adopt()`
    first where this thread also adopts new runners. Polled every 5 ms, one thread per cell:
    a cell process's own CPU figure includes this, so it polls gently."""
    events = ("assigned", "ready", "running", "prefetched")
    seen = dict.fromkeys(events, "")
    while not stop.is_set():
        if adopt is not None:
            adopt()
        now = {
            "assigned": watcher.current_assignment,
            "ready": watcher.loaded_version,
            "running": running(),
            "prefetched": watcher.prefetched[-1] if watcher.prefetched else "",
        }
        for event in events:
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
    realtime: list[bool] = []

    def run_loop() -> None:  # as run_actor runs it: the loop's thread real-time if asked
        granted = args.realtime_priority > 0 and realtime_this_thread(
            args.realtime_priority, cell_id="cell-00"
        )
        realtime.append(granted)
        loop.run(stop)

    threads = [
        threading.Thread(target=run_loop, name="control-loop"),
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
                "tick_log": [[round(t, 4), round(lat, 5), late] for t, lat, late in clock.ticks],
                "adoptions": loop.stats["versions_adopted"],
                "faults": faults,
                "realtime_priority": args.realtime_priority if realtime and realtime[0] else 0,
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
        common += ["--prefetch-mbps", str(args.prefetch_mbps)]
        common += ["--realtime-priority", str(args.realtime_priority)]
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


def swap_floor_cpu_s(path: Path, repeats: int = 3) -> float:
    """The least CPU a cell can spend to take a version it holds: one SHA-256 over its bytes
    and one copy of them (what a cache read checks and moves), in this process, best of a
    few (this machine's other load only adds)."""
    data = path.read_bytes()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        hashlib.sha256(data).hexdigest()
        copy = bytearray(data)
        best = min(best, time.process_time() - start)
        del copy
    return best


def tick_stats(log: list[list[Any]], t0: float, t1: float) -> dict[str, Any]:
    """Cell 0's ticks that started in [t0, t1] (wall time): count, late, p99 and max."""
    lat = sorted(x[1] for x in log if t0 <= x[0] <= t1)
    late = sum(1 for x in log if t0 <= x[0] <= t1 and x[2])
    return {
        "ticks": len(lat),
        "late_ticks": late,
        "p99_lateness_ms": round(1000 * lat[int(0.99 * (len(lat) - 1))], 2) if lat else 0.0,
        "max_lateness_ms": round(1000 * lat[-1], 2) if lat else 0.0,
    }


def _ratio(x: float, floor: float) -> float:
    return round(x / floor, 3) if floor > 0 else float("inf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=16)
    p.add_argument("--layers", type=int, default=5, help="transformer layers of the big model")
    p.add_argument("--hz", type=float, default=20.0, help="cell 0's control rate")
    p.add_argument("--no-cache", action="store_true", help="cells keep no disk cache")
    p.add_argument(
        "--prefetch-mbps",
        type=float,
        default=25.0,
        help="each cell's prefetch bandwidth cap, MB/s (the actor's default)",
    )
    p.add_argument(
        "--cell-procs",
        type=int,
        default=0,
        help="processes for cells 1..N-1 (default: one per cell, as a real fleet)",
    )
    p.add_argument(
        "--realtime-priority",
        type=int,
        default=50,
        help="cell 0's loop thread runs SCHED_FIFO at this priority, as the example real-cell "
        "config asks (0 = an ordinary thread)",
    )
    p.add_argument("--timeout", type=float, default=180.0)
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
    if args.no_cache:
        p.error("prefetch needs the cells' version cache; --no-cache is not supported")
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
        staged = Publisher(registry, root / "versions", signing_key=private, rollout_mode="auto")
        torch.manual_seed(0)
        first = publisher.publish(
            UnifiedPolicy(policy_config("tiny", TASKS, CAMERAS)), training_step=0, data_seen=0
        )
        all_cells = list(range(args.cells))
        others = [f"cell-{c:02d}" for c in all_cells[1:]]
        fleet = Fleet(args, address, public, root / "cells")
        _lower_priority_of_this_process(NICE_OTHERS)  # the learner (cell 0 started at 0)
        figures: dict[str, Any] = {}

        def size_of(version: str) -> int:
            return Path(registry.version(version).weights_path).stat().st_size

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise RuntimeError(f"{what} never happened within {args.timeout} s")

        try:
            need(fleet.wait("running", first.version_id, all_cells, args.timeout), "first run")
            time.sleep(1.0)  # cell 0's loop settles at its rate
            t_quiet = time.time()
            time.sleep(3.0)  # cell 0's ticks with nothing else going on: the quiet floor
            quiet_window = (t_quiet, time.time())

            # 1. One cell alone, cold: a big version pinned to cell 0, the others idle.
            solo = staged.publish(big_model(args.layers, seed=2), training_step=1, data_seen=1)
            t_solo = time.time()
            registry.set_pin("cell-00", solo.version_id, actor="bench", reason="one cell alone")
            need(fleet.wait("running", solo.version_id, [0], args.timeout), "cold solo swap")
            solo_running = fleet.at(0, "running", solo.version_id)[0] - t_solo
            solo_ready = fleet.at(0, "ready", solo.version_id)[0] - t_solo
            solo_cpu = (
                fleet.at(0, "running", solo.version_id)[1]
                - fleet.at(0, "assigned", solo.version_id)[1]
            )
            solo_window = (t_solo, time.time() + 1.0)
            time.sleep(1.0)
            t_unpin = time.time()
            registry.clear_pin("cell-00", actor="bench", reason="back to the fleet")
            need(
                fleet.wait("running", first.version_id, [0], args.timeout, since=t_unpin),
                "cell 0 back on the first version",
            )
            time.sleep(2.0)  # its cache write of the solo version is done, the loop settled

            # 2. One cell alone, prefetched: the others pinned where they are (a pinned cell
            # is not moved by the rollout, so it prefetches nothing); a candidate in canary
            # on a pinned cell is what cell 0 runs next if promoted, so it prefetches it.
            for cell in others:
                registry.set_pin(cell, first.version_id, actor="bench", reason="idle")
            pre = staged.publish(big_model(args.layers, seed=3), training_step=2, data_seen=2)
            t_cand = time.time()
            registry.set_candidate(
                pre.version_id,
                stage="canary",
                cells=others[:1],
                kind="canary",
                actor="bench",
                reason="one cell alone, prefetched",
            )
            need(fleet.wait("prefetched", pre.version_id, [0], args.timeout), "solo prefetch")
            solo_prefetched = fleet.at(0, "prefetched", pre.version_id)[0] - t_cand
            time.sleep(0.5)
            t_promote = time.time()
            registry.clear_candidate(kind="promote", actor="bench", reason="bench", promote=True)
            need(fleet.wait("running", pre.version_id, [0], args.timeout), "solo prefetch swap")
            pre_running = fleet.at(0, "running", pre.version_id)[0] - t_promote
            pre_cpu = (
                fleet.at(0, "running", pre.version_id)[1]
                - fleet.at(0, "assigned", pre.version_id)[1]
            )
            time.sleep(1.0)
            prefetch_window = (t_cand, time.time())
            # Back to where the fleet was, then every cell free again.
            t_back = time.time()
            registry.set_stable(first.version_id, actor="bench", reason="back")
            need(
                fleet.wait("running", first.version_id, [0], args.timeout, since=t_back),
                "cell 0 back on the first version",
            )
            for cell in others:
                registry.clear_pin(cell, actor="bench", reason="back to the fleet")
            time.sleep(2.0)

            # 3. The fleet, prefetched: a candidate in canary on cell 1; the other 15 cells
            # prefetch it; then the promotion, which for them is only a swap.
            cand = staged.publish(big_model(args.layers, seed=4), training_step=3, data_seen=3)
            size = size_of(cand.version_id)
            t_canary = time.time()
            registry.set_candidate(
                cand.version_id,
                stage="canary",
                cells=others[:1],
                kind="canary",
                actor="bench",
                reason="fleet, prefetched",
            )
            swapping = [0, *all_cells[2:]]
            need(fleet.wait("running", cand.version_id, [1], args.timeout), "the canary")
            need(
                fleet.wait("prefetched", cand.version_id, swapping, args.timeout),
                "the fleet's prefetch",
            )
            fleet_prefetched = (
                max(fleet.at(c, "prefetched", cand.version_id)[0] for c in swapping) - t_canary
            )
            time.sleep(0.5)
            t_fleet_promote = time.time()
            registry.clear_candidate(kind="promote", actor="bench", reason="bench", promote=True)
            need(
                fleet.wait("running", cand.version_id, all_cells, args.timeout),
                "the fleet's promotion",
            )
            promoted = [
                fleet.at(c, "running", cand.version_id)[0] - t_fleet_promote for c in swapping
            ]
            pre_swap_cpu = [
                fleet.at(c, "running", cand.version_id)[1]
                - fleet.at(c, "assigned", cand.version_id)[1]
                for c in swapping
            ]
            cand_sent = servicer.bytes_sent[cand.version_id]
            time.sleep(1.0)
            fleet_prefetch_window = (t_canary, time.time())
            time.sleep(1.0)

            # 4. The fleet, cold: a big version published as stable for every cell at once.
            model = big_model(args.layers, seed=1)
            t0 = time.time()
            manifest = publisher.publish(model, training_step=4, data_seen=4)
            t_published = time.time()
            cpu_published = time.process_time()
            version = manifest.version_id
            ok_ready = fleet.wait("ready", version, all_cells, args.timeout)
            ok_running = fleet.wait("running", version, all_cells, args.timeout)
            need(ok_ready and ok_running, "the cold fleet swap")
            learner_cpu = time.process_time() - cpu_published
            per_cell = [fleet.at(c, "running", version)[0] - t_published for c in all_cells]
            per_ready = [fleet.at(c, "ready", version)[0] - t_published for c in all_cells]
            swap_cpu = fleet.swap_cpu(version)
            others_cpu = [cpu for cells, cpu in swap_cpu if 0 not in cells]
            cell0_cpu = next(cpu for cells, cpu in swap_cpu if 0 in cells)
            cells_cpu_total = sum(cpu * len(cells) for cells, cpu in swap_cpu)
            time.sleep(1.0)  # and a second of running the new version
            cold_window = (t0, time.time())
            ticks = fleet.stop((t0, time.time()))
            sent = servicer.bytes_sent[version]
            floor_cpu = swap_floor_cpu_s(Path(registry.version(version).weights_path))
            cpus = os.cpu_count() or 1
            faults = [f for m in fleet.finals for f in m.get("faults", [])]
            log = ticks["tick_log"]
            quiet = tick_stats(log, *quiet_window)
            pre_ticks = tick_stats(log, *prefetch_window)
            median_swap = statistics.median(pre_swap_cpu)
            promoted_all = max(promoted)
            figures = {
                "cells": args.cells,
                "cell_processes": len(fleet.procs),
                "cpus": cpus,
                "model_bytes": size,
                "parameters": manifest.parameter_count,
                "prefetch_mbps": args.prefetch_mbps,
                "floors": {
                    "swap_cpu_s": _r(floor_cpu),  # SHA-256 of the version + one copy
                    "quiet_ticks": quiet,  # cell 0 with nothing else going on
                    "one_cell_prefetched_promotion_to_running_s": _r(pre_running),
                },
                "prefetch": {
                    "one_cell_alone": {
                        "candidate_to_prefetched_s": _r(solo_prefetched),
                        "promotion_to_running_s": _r(pre_running),
                        "swap_cpu_s": _r(pre_cpu),
                        "swap_cpu_ratio_to_floor": _ratio(pre_cpu, floor_cpu),
                        "ticks_while_prefetching_and_swapping": pre_ticks,
                        "p99_ratio_to_quiet": _ratio(
                            pre_ticks["p99_lateness_ms"], quiet["p99_lateness_ms"]
                        ),
                    },
                    "fleet": {
                        "candidate_to_all_prefetched_s": _r(fleet_prefetched),
                        "promotion_to_all_running_s": _r(promoted_all),
                        "promotion_ratio_to_one_cell": _ratio(promoted_all, pre_running),
                        "cell_running_s": {
                            "median": _r(statistics.median(promoted)),
                            "max": _r(promoted_all),
                            "cell_0_with_loop": _r(promoted[0]),
                        },
                        "cell_swap_cpu_s": {
                            "median": _r(median_swap),
                            "max": _r(max(pre_swap_cpu)),
                            "cell_0_with_loop": _r(pre_swap_cpu[0]),
                        },
                        "swap_cpu_ratio_to_floor": _ratio(median_swap, floor_cpu),
                        "learner_bytes_sent": cand_sent,
                        "bytes_sent_ratio": round(cand_sent / (size * args.cells), 4),
                        "ticks": tick_stats(log, *fleet_prefetch_window),
                    },
                },
                "cold": {
                    "one_cell_alone": {
                        "cell": "cell-00",
                        "publication_to_ready_s": _r(solo_ready),
                        "publication_to_running_s": _r(solo_running),
                        "swap_cpu_s": _r(solo_cpu),
                        "swap_cpu_ratio_to_floor": _ratio(solo_cpu, floor_cpu),
                        "ticks": tick_stats(log, *solo_window),
                    },
                    "publish_s": _r(t_published - t0),
                    "publication_to_all_ready_s": _r(max(per_ready)),
                    "publication_to_all_running_s": _r(max(per_cell)),
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
                    "running_ratio_to_cpu_bound": _ratio(
                        max(per_cell), (cells_cpu_total + learner_cpu) / cpus
                    ),
                    "learner_bytes_sent": sent,
                    "bytes_sent_ratio": round(sent / (size * args.cells), 4),
                    "learner_disk_reads": servicer.disk_reads[version],
                    "ticks": tick_stats(log, *cold_window),
                    "late_ticks_at_s": [
                        round(t - t_published, 3) for t in ticks["late_tick_times"] if t >= t0
                    ],
                },
                "tick_period_ms": round(1000 / args.hz, 2),
                "cell_0_realtime_priority": ticks.get("realtime_priority", 0),  # 0: ordinary
                "signature_checked": True,
                "faults": len(faults),
                "goals": {
                    "promotion_to_all_running_s": GOAL_PROMOTION_S,
                    "swap_cpu_ratio_to_floor": GOAL_SWAP_CPU_RATIO,
                    "bytes_sent_ratio": GOAL_BYTES_RATIO,
                    "late_ticks": GOAL_LATE_TICKS,
                    "p99_tick_lateness_ms": GOAL_P99_MS,
                },
            }
            figures["met"] = {
                "promotion_to_all_running_s": promoted_all <= GOAL_PROMOTION_S,
                "swap_cpu_ratio_to_floor": median_swap <= GOAL_SWAP_CPU_RATIO * floor_cpu,
                "bytes_sent_ratio": cand_sent <= GOAL_BYTES_RATIO * size * args.cells,
                "late_ticks": pre_ticks["late_ticks"] <= GOAL_LATE_TICKS,
                "p99_tick_lateness_ms": pre_ticks["p99_lateness_ms"] <= GOAL_P99_MS,
            }
        finally:
            fleet.kill()
            servicer.stop()
            server.stop(0).wait(5)
            registry.close()
    pre_fig, cold = figures["prefetch"], figures["cold"]
    solo_pre = pre_fig["one_cell_alone"]
    print(
        f"{figures['model_bytes'] / 1e6:.1f} MB versions, {figures['cells']} cells in "
        f"{figures['cell_processes']} processes on {figures['cpus']} cpus; swap CPU floor "
        f"(sha256 + one copy) {figures['floors']['swap_cpu_s']} s"
    )
    print(
        f"one cell alone, prefetched: candidate -> prefetched in "
        f"{solo_pre['candidate_to_prefetched_s']} s at <= {args.prefetch_mbps} MB/s; promotion "
        f"-> running {solo_pre['promotion_to_running_s']} s, swap CPU {solo_pre['swap_cpu_s']} s "
        f"({solo_pre['swap_cpu_ratio_to_floor']} x floor); ticks "
        f"{solo_pre['ticks_while_prefetching_and_swapping']} (quiet: "
        f"{figures['floors']['quiet_ticks']})"
    )
    fl = pre_fig["fleet"]
    print(
        f"fleet, prefetched: all prefetched in {fl['candidate_to_all_prefetched_s']} s; "
        f"promotion -> all running {fl['promotion_to_all_running_s']} s (goal <= "
        f"{GOAL_PROMOTION_S} s); swap CPU median {fl['cell_swap_cpu_s']['median']} s "
        f"({fl['swap_cpu_ratio_to_floor']} x floor); learner sent {fl['bytes_sent_ratio']} x "
        f"size x cells"
    )
    print(
        f"cold, one cell alone: publication -> running "
        f"{cold['one_cell_alone']['publication_to_running_s']} s "
        f"({cold['one_cell_alone']['swap_cpu_s']} CPU s); fleet: publication -> all running "
        f"{cold['publication_to_all_running_s']} s (CPU bound {cold['cpu_bound_s']} s), "
        f"learner sent {cold['bytes_sent_ratio']} x size x cells; cell 0 ticks {cold['ticks']}"
    )
    print(f"goals met: {figures['met']}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

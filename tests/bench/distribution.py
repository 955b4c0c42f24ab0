"""Signed policy distribution to a fleet: publication to all cells running a ~100 MB version.

One learner PolicyServicer (real gRPC on loopback, real Redis registry, the real Publisher
signing with Ed25519) and N cells (default 16), each a real PolicyWatcher with the learner's
public key and its own on-disk version cache. Cells 1..N-1 are threads of this process and
adopt a new runner as soon as it is ready. Cell 0 is a light subprocess, like a real edge
actor: its watcher beside a real ControlLoop on the simulated cell at 20 Hz on the wall
clock, which adopts a new version at its next chunk boundary; there tick lateness during
the swap is measured.

Figures (goals from issue 6):
- publication -> every cell has the new version verified and loaded ("ready"), and ->
  every cell runs it ("running"; cell 0 at its next chunk boundary). Goal: running <= 2 s.
- the learner's weight bytes sent for the version against model size x cells (goal: equal:
  each cell fetches once) and how often it read the file from disk (goal: 1).
- cell 0's control loop during the swap: late ticks (more than one period behind; goal 0)
  and how late the latest tick started (max, p99).

All cells share this machine's cores, which a real fleet (a computer per cell) does not:
on a small machine the figures are an upper bound. `cpus` in the output says how many.

Prints a few lines, and as its LAST line one JSON object with figures and goals.
Run: .venv/bin/python tests/bench/distribution.py [--cells 16] [--layers 5]
"""

from __future__ import annotations

import argparse
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
        time.sleep(0.002)
    return None


# -- cell 0: a subprocess with the control loop ------------------------------------------


def run_cell0(args: argparse.Namespace) -> int:
    """Runs until stdin says "stop T0 T1" (wall times), then prints the ticks of that window.
    Prints {"running": version, "t": wall time} each time the loop adopts a version."""
    torch.set_num_threads(1)
    faults: list[str] = []
    watcher = PolicyWatcher(
        args.address,
        "cell-00",
        "",
        deadline_s=30.0,
        on_fault=faults.append,
        verify_key=signing.load_public_key(Path(args.verify_key)),
        cache=None if args.no_cache else VersionCache(Path(args.cache), cell_id="cell-00"),
    )
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

    def report() -> None:
        seen = ""
        while not stop.is_set():
            version = loop.stats["version_running"]
            if version != seen:
                seen = version
                print(json.dumps({"running": version, "t": time.time()}), flush=True)
            time.sleep(0.002)

    watcher.start()
    threads = [
        threading.Thread(target=loop.run, args=(stop,), name="control-loop"),
        threading.Thread(target=report, name="report"),
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


# -- the learner and cells 1..N-1 ----------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=16)
    p.add_argument("--layers", type=int, default=5, help="transformer layers of the big model")
    p.add_argument("--hz", type=float, default=20.0, help="cell 0's control rate")
    p.add_argument("--no-cache", action="store_true", help="cells 1..N-1 keep no disk cache")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--cell0", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--verify-key", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.cell0:
        return run_cell0(args)
    torch.set_num_threads(1)  # one core's worth per cell, as on a cell computer

    with RedisServer() as redis, tempfile.TemporaryDirectory(prefix="dist-bench-") as tmp:
        root = Path(tmp)
        registry = Registry(redis.url, prefix="bench:")
        private, public = signing.write_key_pair(root / "keys")
        verify_key = signing.load_public_key(public)
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

        faults: list[str] = []
        watchers = {
            i: PolicyWatcher(
                address,
                f"cell-{i:02d}",
                "",
                deadline_s=30.0,
                on_fault=faults.append,
                verify_key=verify_key,
                cache=None
                if args.no_cache
                else VersionCache(root / "cells" / f"{i:02d}", cell_id=f"cell-{i:02d}"),
            )
            for i in range(1, args.cells)
        }
        running: dict[int, dict[str, float]] = {i: {} for i in range(args.cells)}
        stop = threading.Event()

        def adopter(i: int) -> None:
            while not stop.is_set():
                runner = watchers[i].take_new()
                if runner is not None:
                    running[i][runner.version_id] = time.time()
                time.sleep(0.002)

        child = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--cell0",
                "--address",
                address,
                "--verify-key",
                str(public),
                "--cache",
                str(root / "cells" / "00"),
                *(["--no-cache"] if args.no_cache else []),
                "--hz",
                str(args.hz),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        assert child.stdin is not None and child.stdout is not None
        child_out: list[dict[str, Any]] = []

        def read_child() -> None:
            assert child.stdout is not None
            for raw in child.stdout:
                msg = json.loads(raw)
                child_out.append(msg)
                if "running" in msg:
                    running[0][msg["running"]] = msg["t"]

        threads = [threading.Thread(target=adopter, args=(i,)) for i in watchers]
        threads.append(threading.Thread(target=read_child, name="cell-0-reader"))
        for w in watchers.values():
            w.start()
        for t in threads:
            t.start()
        figures: dict[str, Any] = {}
        try:
            ok = wait_until(
                lambda: all(first.version_id in r for r in running.values()), args.timeout
            )
            if ok is None:
                raise RuntimeError(f"cells never ran the first version; faults: {faults[-3:]}")
            time.sleep(1.0)  # cell 0's loop settles at its rate

            model = big_model(args.layers, seed=1)
            t0 = time.time()
            manifest = publisher.publish(model, training_step=1, data_seen=1)
            t_published = time.time()
            version = manifest.version_id
            size = Path(registry.version(version)["weights_path"]).stat().st_size
            ok_ready = wait_until(
                lambda: all(w.loaded_version == version for w in watchers.values()),
                args.timeout,
            )
            ok_running = wait_until(
                lambda: all(version in r for r in running.values()), args.timeout
            )
            if ok_ready is None or ok_running is None:
                raise RuntimeError(f"not every cell took {version}; faults: {faults[-3:]}")
            per_cell = [r[version] - t_published for r in running.values()]
            time.sleep(1.0)  # and a second of running the new version
            t_end = time.time()
            child.stdin.write(f"stop {t0} {t_end}\n")
            child.stdin.flush()
            child.wait(60)
            stop.set()
            for t in threads:
                t.join(30)
            ticks = next(m for m in child_out if "ticks" in m)
            sent = servicer.bytes_sent[version]
            figures = {
                "cells": args.cells,
                "cpus": os.cpu_count(),
                "model_bytes": size,
                "parameters": manifest.parameter_count,
                "publish_s": round(t_published - t0, 3),
                "publication_to_all_running_s": round(max(per_cell), 3),
                "goal_running_s": GOAL_RUNNING_S,
                "running_goal_met": max(per_cell) <= GOAL_RUNNING_S,
                "cell_running_s": {
                    "min": round(min(per_cell), 3),
                    "median": round(statistics.median(per_cell), 3),
                    "max": round(max(per_cell), 3),
                    "cell_0_with_loop": round(per_cell[0], 3),
                },
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
                "late_ticks_at_s": [round(t - t_published, 3) for t in ticks["late_tick_times"]],
                "signature_checked": True,
                "cache": not args.no_cache,
                "faults": len(faults) + len(ticks["faults"]),
            }
        finally:
            stop.set()
            if child.poll() is None:
                child.kill()
                child.wait(10)
            for t in threads:
                t.join(30)
            for w in watchers.values():
                w.stop()
            servicer.stop()
            server.stop(0).wait(5)
            registry.close()
    print(
        f"{figures['cells']} cells, {figures['model_bytes'] / 1e6:.1f} MB version on "
        f"{figures['cpus']} cpus: publish {figures['publish_s']} s, then every cell running it "
        f"in {figures['publication_to_all_running_s']} s (goal <= {GOAL_RUNNING_S} s)"
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

"""Benchmark: one control tick's bus traffic for 14 servos through dynamixel_sdk and a pty.

A tick is one sync read of present current+velocity+position (10 bytes a servo) and one
sync write of goal positions, for 14 servos. Measured on one bus of 14 (the raw
DynamixelBus) and as two DynamixelArmBus of 7 (the cell's layout, with unit conversion),
each without and with the simulated 1 Mbps wire-time model; and once with the SDK's
stock spinning reads, to show the CPU the select()-based port handler saves. The goal:
the round trip fits a 50 Hz control tick, p99 < 20 ms.

    .venv/bin/python tests/bench/dynamixel_roundtrip.py --iterations 500

The last line printed is one JSON object with every figure and whether the goals are met.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import numpy as np

from drivers.calibration import default_calibration
from drivers.dynamixel import control_table as ct
from drivers.dynamixel.arm_bus import DynamixelArmBus, DynamixelBus
from drivers.sim.servo_peer import ServoPeer

GOAL_P99_MS = 20.0  # a 50 Hz tick


def _measure(tick: Callable[[int], None], iterations: int) -> dict[str, float]:
    for i in range(min(20, iterations)):
        tick(i)  # warm up
    times = np.empty(iterations)
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    for i in range(iterations):
        t0 = time.perf_counter()
        tick(i)
        times[i] = time.perf_counter() - t0
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    ms = times * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "max_ms": round(float(ms.max()), 3),
        "hz": round(iterations / wall, 1),
        "driver_cpu_fraction": round(cpu / wall, 3),
    }


def bench_one_bus(
    iterations: int, wire_model: bool, read_wait_s: float = 0.002
) -> dict[str, float]:
    """`read_wait_s=0` is the stock SDK behaviour: spin on the port while waiting."""
    ids = tuple(range(1, 15))
    with ServoPeer(ids, wire_model=wire_model) as peer:
        bus = DynamixelBus(peer.port, ids, read_wait_s=read_wait_s)
        bus.open()
        try:
            for sid in ids:
                bus.write(sid, ct.RETURN_DELAY_TIME, 0)
                bus.write(sid, ct.TORQUE_ENABLE, 1)

            def tick(i: int) -> None:
                bus.sync_read(ct.STATE_BLOCK_ADDRESS, ct.STATE_BLOCK_SIZE)
                goal = 2048 + (i % 100)
                bus.sync_write(ct.GOAL_POSITION.address, 4, dict.fromkeys(ids, goal))

            return _measure(tick, iterations)
        finally:
            bus.close()


def bench_two_arms(iterations: int, wire_model: bool) -> dict[str, float]:
    cal = default_calibration()
    with (
        ServoPeer(range(1, 8), wire_model=wire_model) as lp,
        ServoPeer(range(1, 8), wire_model=wire_model) as rp,
    ):
        arms = [
            DynamixelArmBus("left", lp.port, cal.arm("left")),
            DynamixelArmBus("right", rp.port, cal.arm("right")),
        ]
        try:
            for arm in arms:
                arm.set_torque(True)
            target = np.zeros(7)

            def tick(i: int) -> None:
                target[0] = 0.2 * np.sin(i / 20)
                for arm in arms:
                    arm.read_state()
                for arm in arms:
                    arm.write_goal(target)

            return _measure(tick, iterations)
        finally:
            for arm in arms:
                arm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=500)
    args = parser.parse_args()
    n = args.iterations
    results: dict[str, dict[str, float]] = {}
    for wire in (False, True):
        tag = "wire_1mbps" if wire else "no_wire"
        results[f"one_bus_14_{tag}"] = bench_one_bus(n, wire)
        print(f"one bus of 14, {tag}: {results[f'one_bus_14_{tag}']}", flush=True)
        results[f"two_arms_7_{tag}"] = bench_two_arms(n, wire)
        print(f"two arms of 7, {tag}: {results[f'two_arms_7_{tag}']}", flush=True)
    results["one_bus_14_wire_1mbps_sdk_spin"] = bench_one_bus(n, True, read_wait_s=0.0)
    print(f"one bus of 14, spinning reads: {results['one_bus_14_wire_1mbps_sdk_spin']}")
    worst = max(r["p99_ms"] for r in results.values())
    summary = {
        "bench": "dynamixel_roundtrip",
        "servos": 14,
        "iterations": n,
        "cpus": os.cpu_count(),
        "results": results,
        "worst_p99_ms": worst,
        "goals": {"p99_ms_below": GOAL_P99_MS},
        "met": {"p99_ms_below": worst < GOAL_P99_MS},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

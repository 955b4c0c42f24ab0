"""Control steps per second of the MuJoCo cell, and what the SDK path costs on top of it.

Part 1, the bare world at 50 Hz control (10 physics substeps of 2 ms per step), unpaced:
without rendering, with the scripted expert planning every step, and rendering two cameras
(overhead, front; colour + depth) every step at 96x128 and at 240x320. Goals: >= 20x real
time without rendering (a policy's loop: set_goals, advance, joint_positions), >= 10x with
the expert, and >= 1x real time with two 240x320 cameras (realtime factor = steps/s x 0.02 s).

Part 2, the cell as `fleet up` runs it (20 Hz, two 96x128 cameras): the SDK cell
(drivers/sim/sdk_cell.py: DynamixelArmBus -> dynamixel_sdk -> pty -> servo peer processes ->
shared memory -> MuJoCo; MuJoCo renderer -> pyrealsense2 software device -> RealSenseCamera)
driven tick by tick like the control loop (observe, command, sleep until the next tick), in
its default real-time mode and in lockstep (`fleet eval`). Its floor, measured in the same
run: the same world, scene, cameras and goals stepped and rendered directly, unpaced, with
no SDK, servo peer or RealSense path (also printed: that floor paced in real time, which
tells the cost of sleeping between ticks from the cost of the SDK path). Figures are
control steps per CPU-second: the CPU time of every process involved (this process with all
its threads, and the servo peers, its children), so the ratio means much the same on a
loaded machine and an idle one. Goal: real-time SDK cell >= 0.6 x the (unpaced) floor.
Each figure also splits that CPU by part (`cpu_ms_per_step_by_part`: the ticking thread,
Mesa's render threads, the servo peer processes, other threads), which says where the SDK
cell's extra cost goes.

Why: a simulated fleet runs many cells on one machine, and data collection and evaluation
run faster than real time; a cell must not be what limits them, and the SDK path that makes
the sim honest must not cost the learner most of the machine.

Prints a few lines, and as its LAST line one JSON object with figures, goals and `met`.
Run: .venv/bin/python tests/bench/sim_steps.py [--seconds 2] [--cell-seconds 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

from drivers.sim.mujoco.world import MujocoWorld
from drivers.sim.sdk_cell import make_sdk_sim_cell

HZ = 50.0
CAMERAS = ("overhead", "front")
CELL_HZ = 20.0  # what `fleet up` runs a cell at (fleet actor --control-hz)
CELL_SIZE = (96, 128)  # ... and its cameras' size (--height, --width)
GOALS = {
    "realtime_x_no_render_min": 20.0,
    "realtime_x_expert_min": 10.0,
    "realtime_x_2cam_240x320_min": 1.0,
    "sdk_cell_vs_floor_min": 0.6,
}


def run(seconds: float, mode: str, size: tuple[int, int] | None = None) -> dict[str, float]:
    """Steps `mode` ("policy": fixed goals, "expert": scripted expert) for ~`seconds`."""
    world = MujocoWorld(0, "handover_bar", control_hz=HZ)
    try:
        goals = world.joint_positions()
        if size is not None:
            for cam in CAMERAS:  # GL context and first-frame costs stay out of the figures
                world.render(cam, *size)
        steps, per_step = 0, []
        t0 = time.perf_counter()
        t_end = t0 + seconds
        while time.perf_counter() < t_end:
            t = time.perf_counter()
            if steps % 400 == 0:
                world.reset("handover_bar", steps // 400)
            if mode == "expert":
                goals = world.expert_action()
            world.set_goals(goals)
            world.advance(1.0 / HZ)
            world.joint_positions()
            if size is not None:
                for cam in CAMERAS:
                    world.render(cam, *size)
            per_step.append(time.perf_counter() - t)
            steps += 1
        elapsed = time.perf_counter() - t0
    finally:
        world.close()
    rate = steps / elapsed
    ms = np.asarray(per_step) * 1000.0
    return {
        "steps": steps,
        "steps_per_s": round(rate, 1),
        "realtime_x": round(rate / HZ, 2),
        "ms_p50": round(float(np.percentile(ms, 50)), 3),
        "ms_p99": round(float(np.percentile(ms, 99)), 3),
    }


def tick_goals(start: np.ndarray, k: int) -> np.ndarray:
    """Tick k's 14 goals: both shoulders and upper arms swaying gently about `start`, so
    the arms move, the bus carries real changes and every frame differs."""
    goals = np.asarray(start, np.float64).copy()
    goals[[0, 1, 7, 8]] += 0.15 * np.sin(2.0 * np.pi * k / CELL_HZ * 0.5)
    return goals


def cpu_parts_s() -> dict[str, float]:
    """User + system CPU seconds of this process and its live children, by part: "main"
    (the ticking thread), "render" (Mesa's llvmpipe threads), "servo_peers" (the children),
    "other_threads" (the SDKs', the cell watchdog, ...)."""
    me = psutil.Process()
    parts = dict.fromkeys(("main", "render", "servo_peers", "other_threads"), 0.0)
    main = threading.get_native_id()
    for t in me.threads():
        try:
            with open(f"/proc/{me.pid}/task/{t.id}/comm") as f:
                comm = f.read().strip()
        except OSError:
            comm = ""
        part = "main" if t.id == main else "render" if comm.startswith("llvmpipe") else None
        parts[part or "other_threads"] += t.user_time + t.system_time
    for proc in me.children(recursive=True):
        try:
            c = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        parts["servo_peers"] += c.user + c.system
    return parts


def _figures(steps: int, cpu: dict[str, float], wall_s: float) -> dict[str, Any]:
    cpu_s = sum(cpu.values())
    return {
        "steps": steps,
        "cpu_s": round(cpu_s, 3),
        "steps_per_cpu_s": round(steps / cpu_s, 1),
        "cpu_ms_per_step": round(cpu_s / steps * 1000.0, 3),
        "cpu_ms_per_step_by_part": {k: round(v / steps * 1000.0, 3) for k, v in cpu.items()},
        "steps_per_s": round(steps / wall_s, 1),
    }


def _measure(tick: Callable[[int], None], seconds: float, paced: bool = False) -> dict[str, Any]:
    """Runs `tick` for ~`seconds` after a few untimed ones; `paced`: at CELL_HZ in real
    time, sleeping between ticks as SimClock does (0 lag: never bursts to catch up)."""
    for k in range(5):  # GL contexts, pipelines, first frames stay out of the figures
        tick(k)
    cpu0, t0 = cpu_parts_s(), time.perf_counter()
    steps = 0
    while time.perf_counter() - t0 < seconds:
        tick(5 + steps)
        steps += 1
        if paced:
            time.sleep(max(0.0, t0 + steps / CELL_HZ - time.perf_counter()))
    cpu1 = cpu_parts_s()
    return _figures(steps, {k: cpu1[k] - cpu0[k] for k in cpu1}, time.perf_counter() - t0)


def cell_floor(seconds: float, paced: bool = False) -> dict[str, Any]:
    """The physics + render floor of a `fleet up` cell tick: goals in, 1/CELL_HZ of physics,
    joint positions out, every camera rendered; no SDK, servo peer or RealSense path.
    `paced`: in real time like the real-time cell, to tell the cost of sleeping between
    ticks (caches gone cold, threads woken) from the cost of the SDK path."""
    world = MujocoWorld(0, control_hz=CELL_HZ)
    start = world.joint_positions()

    def tick(k: int) -> None:
        world.set_goals(tick_goals(start, k))
        world.advance(1.0 / CELL_HZ)
        world.joint_positions()
        for cam in CAMERAS:
            world.render(cam, *CELL_SIZE)

    try:
        return _measure(tick, seconds, paced)
    finally:
        world.close()


def sdk_cell(seconds: float, lockstep: bool) -> dict[str, Any]:
    """The SDK cell ticked like the control loop ticks it: observe (two sync reads, every
    camera read through pyrealsense2), command (two sync writes), sleep until the next tick
    (the physics steps there; real time paces it unless `lockstep`, which runs unpaced)."""
    cell = make_sdk_sim_cell(
        "bench",
        cameras=CAMERAS,
        height=CELL_SIZE[0],
        width=CELL_SIZE[1],
        control_hz=CELL_HZ,
        realtime_factor=0.0 if lockstep else 1.0,
        takeover_prob=0.0,
        lockstep=lockstep,
    )
    try:
        hw = cell.hardware
        start = hw.read_joints().astype(np.float64)
        t0 = cell.clock.now()

        def tick(k: int) -> None:
            hw.observe()
            hw.command(tick_goals(start, k))
            cell.clock.sleep_until(t0 + (k + 1) / CELL_HZ)

        fig = _measure(tick, seconds)
        fig["watchdog_holds"] = hw.watchdog_holds
        return fig
    finally:
        cell.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per bare-world figure")
    parser.add_argument("--cell-seconds", type=float, default=8.0, help="per cell figure")
    parser.add_argument("--rounds", type=int, default=2, help="floor/SDK cell rounds")
    args = parser.parse_args()
    figures: dict[str, object] = {
        "no_render": run(args.seconds, "policy"),
        "expert_no_render": run(args.seconds, "expert"),
        "2cam_96x128": run(args.seconds, "policy", (96, 128)),
        "2cam_240x320": run(args.seconds, "policy", (240, 320)),
    }
    for name, fig in figures.items():
        print(f"{name:>18}: {fig}")
    rounds: dict[str, list[dict[str, Any]]] = {
        "floor": [],
        "floor_paced": [],
        "realtime": [],
        "lockstep": [],
    }
    for r in range(args.rounds):  # interleaved, so drift in the machine's load hits all alike
        rounds["floor"].append(cell_floor(args.cell_seconds))
        rounds["floor_paced"].append(cell_floor(args.cell_seconds, paced=True))
        rounds["realtime"].append(sdk_cell(args.cell_seconds, lockstep=False))
        rounds["lockstep"].append(sdk_cell(args.cell_seconds, lockstep=True))
        for name, runs in rounds.items():
            print(f"round {r} {name:>9}: {runs[-1]}", flush=True)

    def rate(name: str) -> float:
        return float(np.median([f["steps_per_cpu_s"] for f in rounds[name]]))

    floor = rate("floor")
    ratios = {f"sdk_cell_{m}_vs_floor": round(rate(m) / floor, 3) for m in ("realtime", "lockstep")}
    # Not a goal: the real-time cell against the floor paced the same way, i.e. what the SDK
    # path costs apart from sleeping between ticks.
    ratios["sdk_cell_realtime_vs_paced_floor"] = round(rate("realtime") / rate("floor_paced"), 3)
    figures["cell"] = {
        "control_hz": CELL_HZ,
        "size": list(CELL_SIZE),
        "floor_steps_per_cpu_s": round(floor, 1),
        "paced_floor_steps_per_cpu_s": round(rate("floor_paced"), 1),
        "realtime_steps_per_cpu_s": round(rate("realtime"), 1),
        "lockstep_steps_per_cpu_s": round(rate("lockstep"), 1),
        **ratios,
        "rounds": rounds,
    }
    print(f"{'cell':>18}: { ({k: v for k, v in figures['cell'].items() if k != 'rounds'}) }")
    met = {
        "realtime_x_no_render_min": figures["no_render"]["realtime_x"]  # type: ignore[index]
        >= GOALS["realtime_x_no_render_min"],
        "realtime_x_expert_min": figures["expert_no_render"]["realtime_x"]  # type: ignore[index]
        >= GOALS["realtime_x_expert_min"],
        "realtime_x_2cam_240x320_min": figures["2cam_240x320"]["realtime_x"]  # type: ignore[index]
        >= GOALS["realtime_x_2cam_240x320_min"],
        "sdk_cell_vs_floor_min": ratios["sdk_cell_realtime_vs_floor"]
        >= GOALS["sdk_cell_vs_floor_min"],
    }
    result = {
        "bench": "sim_steps",
        "control_hz": HZ,
        "substeps_per_step": 10,
        "cameras": list(CAMERAS),
        "figures": figures,
        "goals": GOALS,
        "met": met,
        "pass": all(met.values()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

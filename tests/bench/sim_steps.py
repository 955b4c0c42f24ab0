"""Control steps per second of the MuJoCo cell at 50 Hz control (10 physics substeps of
2 ms per step), unpaced: without rendering, and rendering two cameras (overhead, front;
colour + depth) every step at 96x128 and at 240x320.

Why: a simulated fleet runs many cells on one machine, and data collection and evaluation
run faster than real time; a cell must not be what limits them. Goals: >= 20x real time
without rendering (a policy's loop: set_goals, advance, joint_positions), >= 10x with the
scripted expert planning every step, and >= 1x real time with two 240x320 cameras. The
realtime factor is steps per second x 0.02 s.

Prints a few lines, and as its LAST line one JSON object with figures and goals.
Run: .venv/bin/python tests/bench/sim_steps.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from drivers.sim.mujoco.world import MujocoWorld

HZ = 50.0
CAMERAS = ("overhead", "front")
GOALS = {
    "realtime_x_no_render_min": 20.0,
    "realtime_x_expert_min": 10.0,
    "realtime_x_2cam_240x320_min": 1.0,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    figures = {
        "no_render": run(args.seconds, "policy"),
        "expert_no_render": run(args.seconds, "expert"),
        "2cam_96x128": run(args.seconds, "policy", (96, 128)),
        "2cam_240x320": run(args.seconds, "policy", (240, 320)),
    }
    for name, fig in figures.items():
        print(f"{name:>18}: {fig}")
    ok = (
        figures["no_render"]["realtime_x"] >= GOALS["realtime_x_no_render_min"]
        and figures["expert_no_render"]["realtime_x"] >= GOALS["realtime_x_expert_min"]
        and figures["2cam_240x320"]["realtime_x"] >= GOALS["realtime_x_2cam_240x320_min"]
    )
    result = {
        "bench": "sim_steps",
        "control_hz": HZ,
        "substeps_per_step": 10,
        "cameras": list(CAMERAS),
        "figures": figures,
        "goals": GOALS,
        "pass": ok,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

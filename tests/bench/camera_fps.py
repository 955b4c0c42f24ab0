"""Frames per second through the RealSense SDK path: software-device push -> pipeline ->
`RealSenseCamera.read`, colour 240x320 RGB8 plus depth, one camera, for ~3 s.

Why: a sim cell feeds its cameras through this path every tick, and a real cell reads 2 to
4 cameras at 30 fps; the driver's share of a tick must stay small. Goals: >= 60 fps one
camera (so a 30 fps camera is never the bottleneck) and p99 per frame under one 30 fps
period (33 ms). Push and read run back to back, unpaced: fps is the path's throughput.
Also reported, not judged: the same with rs.align forced on.

Prints a few lines, and as its LAST line one JSON object with figures and goals.
Run: .venv/bin/python tests/bench/camera_fps.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Literal

import numpy as np

from drivers.realsense import RealSenseCamera
from drivers.sim.rs_software import SoftwareRealSense

H, W = 240, 320
GOAL_FPS = 60.0
GOAL_P99_MS = 1000.0 / 30.0


def frames(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n distinct colour/depth pairs (a moving square over gradients), made up front."""
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for k in range(n):
        color = np.stack([xx % 256, yy % 256, (xx + yy + k) % 256], -1).astype(np.uint8)
        depth = (500 + 3 * xx + 2 * yy).astype(np.uint16)
        top, left = (7 * k) % (H - 40), (11 * k) % (W - 40)
        color[top : top + 40, left : left + 40] = 255
        depth[top : top + 40, left : left + 40] = 300
        out.append((color, depth))
    return out


def run(seconds: float, align: Literal["auto", "always"]) -> dict[str, float]:
    sensor = SoftwareRealSense(f"BENCH-{align}", W, H, fps=30)
    cam = RealSenseCamera("bench", sensor.serial, H, W, device=sensor.device, align=align)
    pairs = frames(16)
    per_frame: list[float] = []
    mismatches = 0
    stale = 0  # reads that returned another frame than the one just pushed
    try:
        t_end = time.perf_counter() + seconds
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() < t_end:
            color, depth = pairs[k % len(pairs)]
            t = time.perf_counter()
            number = sensor.push(color, depth, k / 30.0)
            frame = cam.read(timeout_s=1.0)
            per_frame.append(time.perf_counter() - t)
            stale += cam.last_frame_number != number
            # rs.align (forced) resamples depth, so only colour must match exactly then
            exact_depth = align == "auto"
            if k % 7 == 0 and not (
                np.array_equal(frame.color, color)
                and (not exact_depth or np.array_equal(frame.depth, depth))
            ):
                mismatches += 1
            k += 1
        elapsed = time.perf_counter() - t0
    finally:
        cam.close()
    ms = np.asarray(per_frame) * 1000.0
    return {
        "frames": len(per_frame),
        "fps": round(len(per_frame) / elapsed, 1),
        "ms_p50": round(float(np.percentile(ms, 50)), 3),
        "ms_p99": round(float(np.percentile(ms, 99)), 3),
        "content_mismatches": mismatches,
        "stale_reads": stale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    auto = run(args.seconds, "auto")
    print(f"push->read 240x320 RGB8+Z16: {auto}")
    forced = run(min(args.seconds, 1.0), "always")
    print(f"same with rs.align forced:   {forced}")
    goals = {
        "fps_min": GOAL_FPS,
        "ms_p99_max": round(GOAL_P99_MS, 2),
        "content_mismatches": 0,
        "stale_reads": 0,
    }
    met = {
        "fps_min": auto["fps"] >= GOAL_FPS,
        "ms_p99_max": auto["ms_p99"] <= GOAL_P99_MS,
        "content_mismatches": auto["content_mismatches"] == forced["content_mismatches"] == 0,
        "stale_reads": auto["stale_reads"] == forced["stale_reads"] == 0,
    }
    result = {
        "bench": "camera_fps",
        "path": "rs.software_device push -> pipeline -> RealSenseCamera.read",
        "resolution": [H, W],
        "figures": {**auto, "align_forced": forced},
        "goals": goals,
        "met": met,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

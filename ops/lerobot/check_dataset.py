"""Load a `fleet export` dataset with LeRobot's own LeRobotDataset and check what it returns.

Runs in LeRobot's venv (ops/lerobot/roundtrip.sh builds it), never in the project's: it
imports only lerobot, its dependencies (torch, pyarrow) and the standard library.

What LeRobot returns is checked against the numbers the export computed from the store: the
per-episode stats (`stats/<feature>/<stat>` in meta/episodes, which LeRobot's loader leaves
out). For a few episodes, every frame is read through LeRobotDataset; the state's mean must
match exactly, each depth map must lie within the episode's depth min/max and its mean over
the frames the export sampled must match to a thousandth of a millimetre (the depth video is
lossless), and colour means must match to the H.264 loss. Depth decoded with other
quantisation parameters or in another unit, or a video window one frame out of step with
its rows, fails here.

    python ops/lerobot/check_dataset.py [--video-backend pyav|torchcodec] DATASET_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

IMAGE_STATS_SAMPLES = 32  # learner/export/lerobot.py samples this many frames per episode
COLOUR_MEAN_TOL = 0.03  # [0, 1] units: H.264 at crf 23 moves a channel mean by far less
# Both sides round the same lossless 12-bit codes to whole millimetres, so the means agree
# exactly but for a pixel or so on a rounding boundary (float32 there, float64 here); one
# frame out of step moves them by thousandths of a millimetre even in a nearly still scene.
DEPTH_MEAN_TOL_MM = 1e-3
STATE_MEAN_TOL = 1e-4


def _picks(n: int) -> list[int]:
    """The frames of an n-frame episode the exporter's image stats were computed on."""
    k = min(n, IMAGE_STATS_SAMPLES)
    return sorted({int(i * (n - 1) / (k - 1)) if k > 1 else 0 for i in range(k)})


def check_episode(ds: Any, row: dict[str, Any], info: dict[str, Any]) -> dict[str, float]:
    """Compare one episode as LeRobot returns it to the export's stats; returns the gaps."""
    import torch

    start, end = int(row["dataset_from_index"]), int(row["dataset_to_index"])
    items = [ds[i] for i in range(start, end)]
    e = int(row["episode_index"])
    assert all(int(it["episode_index"]) == e for it in items), f"episode {e}: rows of another"
    assert [int(it["frame_index"]) for it in items] == list(range(end - start)), e
    gaps: dict[str, float] = {}
    state = torch.stack([it["observation.state"] for it in items]).double().mean(0)
    want = torch.tensor(row["stats/observation.state/mean"], dtype=torch.float64)
    gaps["observation.state"] = float((state - want).abs().max())
    assert gaps["observation.state"] < STATE_MEAN_TOL, (e, gaps)
    picks = _picks(end - start)
    for key, ft in info["features"].items():
        if ft["dtype"] != "video":
            continue
        frames = torch.stack([items[i][key] for i in picks]).double()  # (k, C, H, W)
        mean = frames.mean(dim=(0, 2, 3))
        want = torch.tensor(row[f"stats/{key}/mean"], dtype=torch.float64).reshape(-1)
        gaps[key] = float((mean - want).abs().max())
        if ft.get("info", {}).get("is_depth_map"):
            lo = float(torch.tensor(row[f"stats/{key}/min"]).min())
            hi = float(torch.tensor(row[f"stats/{key}/max"]).max())
            got_lo, got_hi = float(frames.min()), float(frames.max())
            assert lo - 0.5 <= got_lo and got_hi <= hi + 0.5, (e, key, got_lo, got_hi, lo, hi)
            assert gaps[key] < DEPTH_MEAN_TOL_MM, (e, key, gaps[key])
        else:
            assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0, (e, key)
            assert gaps[key] < COLOUR_MEAN_TOL, (e, key, gaps[key])
    return gaps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path, help="the directory `fleet export --out` wrote")
    p.add_argument("--video-backend", default=None, help="pyav or torchcodec (LeRobot's default)")
    args = p.parse_args()
    import pyarrow.parquet as pq
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    info = json.loads((args.dataset / "meta" / "info.json").read_text())
    ds = LeRobotDataset("local/fleet-export", root=args.dataset, video_backend=args.video_backend)
    assert len(ds) == info["total_frames"], (len(ds), info["total_frames"])
    assert ds.num_episodes == info["total_episodes"], (ds.num_episodes, info["total_episodes"])
    depth_keys = [k for k, ft in info["features"].items() if ft.get("info", {}).get("is_depth_map")]
    assert sorted(ds.meta.depth_keys) == sorted(depth_keys), (ds.meta.depth_keys, depth_keys)
    for feature in info["features"]:
        if feature in ds.meta.stats:
            assert "q01" in ds.meta.stats[feature] and "q99" in ds.meta.stats[feature], feature
    print(
        f"LeRobotDataset: {ds.num_episodes} episodes, {len(ds)} frames, "
        f"depth maps {depth_keys or 'none'}, keys {sorted(ds[0])}"
    )
    rows = pq.read_table(args.dataset / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    episodes = rows.to_pylist()
    for e in sorted({0, len(episodes) // 2, len(episodes) - 1}):
        gaps = check_episode(ds, episodes[e], info)
        shown = ", ".join(f"{k} {v:.3g}" for k, v in gaps.items())
        n = episodes[e]["length"]
        print(f"episode {e} ({n} frames) matches its stats; |mean gap|: {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

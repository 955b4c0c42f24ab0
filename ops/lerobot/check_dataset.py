"""Load a `fleet export` dataset with LeRobot's own LeRobotDataset and check what it returns.

Runs in LeRobot's venv (ops/lerobot/roundtrip.sh builds it), never in the project's: it
imports only lerobot, torch and the standard library.

    python ops/lerobot/check_dataset.py DATASET_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path, help="the directory `fleet export --out` wrote")
    args = p.parse_args()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    info = json.loads((args.dataset / "meta" / "info.json").read_text())
    ds = LeRobotDataset("local/fleet-export", root=args.dataset)
    assert len(ds) == info["total_frames"], (len(ds), info["total_frames"])
    assert ds.num_episodes == info["total_episodes"], (ds.num_episodes, info["total_episodes"])
    depth_keys = [k for k, ft in info["features"].items() if ft.get("info", {}).get("is_depth_map")]
    for index in (0, len(ds) - 1):
        item = ds[index]
        for key, ft in info["features"].items():
            if ft["dtype"] == "video":
                h, w, c = ft["shape"]
                assert tuple(item[key].shape) == (c, h, w), (key, tuple(item[key].shape))
        for key in depth_keys:  # millimetres, as the store holds them (up to 12-bit coding)
            lo, hi = float(item[key].min()), float(item[key].max())
            assert 0.0 <= lo <= hi <= 10_000.0, (key, lo, hi)
    for feature in info["features"]:
        if feature in ds.meta.stats:
            assert "q01" in ds.meta.stats[feature] and "q99" in ds.meta.stats[feature], feature
    print(
        f"LeRobotDataset: {ds.num_episodes} episodes, {len(ds)} frames, "
        f"depth maps {depth_keys or 'none'}, keys {sorted(ds[0])}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

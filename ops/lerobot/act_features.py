"""Print the `--policy.input_features` JSON lerobot-train needs to train ACT on an export.

LeRobot's ACT (0.6) feeds every visual feature to a ResNet that takes three channels, and
LeRobot keeps depth maps as one channel (`"is_depth_map": true`), so ACT on a dataset with
depth cameras fails at its first step unless its inputs are named: the state and the colour
cameras, shaped channel-first as ACT sees them. Depth stays in the dataset (check_dataset.py
loads it); only this policy leaves it out. Standard library only, so any Python runs it.

    python ops/lerobot/act_features.py DATASET_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

STATE_KEY = "observation.state"


def act_input_features(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """ACT's inputs from an info.json: the state, then each 3-channel video, as LeRobot's
    PolicyFeature fields (type, channel-first shape)."""
    features = info["features"]
    if STATE_KEY not in features:
        raise ValueError(f"the dataset has no {STATE_KEY!r} feature; ACT needs one")
    out: dict[str, dict[str, Any]] = {
        STATE_KEY: {"type": "STATE", "shape": list(features[STATE_KEY]["shape"])}
    }
    for key, ft in features.items():
        if ft["dtype"] not in ("video", "image") or ft.get("info", {}).get("is_depth_map"):
            continue
        height, width, channels = ft["shape"]
        if channels == 3:
            out[key] = {"type": "VISUAL", "shape": [channels, height, width]}
    if len(out) == 1:
        raise ValueError("the dataset has no colour camera; ACT needs at least one")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path, help="the directory `fleet export --out` wrote")
    args = p.parse_args()
    info = json.loads((args.dataset / "meta" / "info.json").read_text())
    print(json.dumps(act_input_features(info)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

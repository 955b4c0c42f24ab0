"""The learning run's picture: each task's curve and held-out dots land where its numbers say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from fleet.common.registry_records import VersionRecord
from ops.curve_png import COLOURS, MARGIN, SIZE, EvalPoint, draw_success_curve

REPO = Path(__file__).resolve().parents[1]


def _pixel(minutes: float, rate: float, x_max: float) -> tuple[int, int]:
    left, top, right, bottom = MARGIN
    x0, y0, x1, y1 = left, top, SIZE[0] - right, SIZE[1] - bottom
    return round(x0 + (x1 - x0) * minutes / x_max), round(y1 - (y1 - y0) * rate)


def _near(img: Image.Image, xy: tuple[int, int], colour: tuple[int, int, int], r: int = 2) -> bool:
    x, y = xy
    return any(
        img.getpixel((x + dx, y + dy)) == colour
        for dx in range(-r, r + 1)
        for dy in range(-r, r + 1)
    )


def test_curve_points_and_eval_dots_are_drawn_where_the_numbers_put_them(tmp_path: Path) -> None:
    lines = {
        "place_cube": [(1.0, 0.0), (2.0, 0.5), (3.0, None), (4.0, 1.0)],
        "handover_bar": [(1.0, 0.2), (4.0, 0.9)],
    }
    evals = {"place_cube": [EvalPoint(10.0, 0.6, 0.3, 0.85)]}
    path = draw_success_curve(lines, tmp_path / "docs" / "curve.png", title="t", evals=evals)
    img = Image.open(path).convert("RGB")
    assert img.size == SIZE
    handover, place = COLOURS[0], COLOURS[1]  # tasks are coloured in sorted order
    x_max = 10.0  # the last point at 10 min; the axis ends on a whole 5 minutes
    for minutes, rate in [(1.0, 0.0), (2.0, 0.5), (4.0, 1.0)]:
        assert _near(img, _pixel(minutes, rate, x_max), place)
    assert _near(img, _pixel(1.0, 0.2, x_max), handover)
    assert _near(img, _pixel(4.0, 0.9, x_max), handover)
    assert _near(img, _pixel(10.0, 0.6, x_max), place)  # the held-out dot
    assert _near(img, _pixel(10.0, 0.3, x_max), place)  # and its interval's ends
    assert _near(img, _pixel(10.0, 0.85, x_max), place)
    # A window without episodes breaks the line: nothing between 2 and 4 minutes at 75 %.
    assert not _near(img, _pixel(3.0, 0.75, x_max), place, r=1)


def test_learning_run_replots_a_saved_run(tmp_path: Path) -> None:
    run = {
        "args": {"cells": 2, "sim_backend": "mujoco", "interval": 300},
        "curve": [
            {"t_s": 300, "tasks": {"push_to_target": {"episodes": 4, "rate": 0.25}}},
            {"t_s": 600, "tasks": {"push_to_target": {"episodes": 0, "rate": None}}},
        ],
        "held_out": [
            {
                "t_s": 590,
                "tasks": {
                    "push_to_target": {"successes": 7, "episodes": 10, "low": 0.4, "high": 0.9}
                },
            }
        ],
    }
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(run))
    png = tmp_path / "run.png"
    done = subprocess.run(
        [sys.executable, "ops/learning_run.py", "--replot", str(saved), "--png", str(png)],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin"},  # as the README runs it: no PYTHONPATH
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    img = Image.open(png).convert("RGB")
    assert _near(img, _pixel(5.0, 0.25, 10.0), COLOURS[0])
    assert _near(img, _pixel(590 / 60, 0.7, 10.0), COLOURS[0])


def test_learning_run_evaluates_published_versions_as_fleet_eval_and_stores_it(
    registry, tmp_path: Path
) -> None:
    import torch

    from fleet.common.policy.config import policy_config
    from fleet.common.policy.manifest import Manifest
    from fleet.common.policy.model import UnifiedPolicy
    from fleet.common.policy.weights import save_version
    from fleet.common.scenes import heldout_seed
    from ops.learning_run import held_out

    torch.set_num_threads(1)
    tasks = ("handover_bar", "place_cube", "push_to_target")
    model = UnifiedPolicy(policy_config("tiny", tasks, ("overhead", "front")))
    manifest = Manifest(
        version_id="v0003",
        parent=None,
        model_config=model.config.to_dict(),
        training_step=450,
        data_seen=0,
        sha256="",
    )
    weights, manifest_path = save_version(tmp_path / "versions", model, manifest)
    registry.add_version(manifest.to_json(), str(weights))
    versions = [
        VersionRecord(json.loads(manifest.to_json()), str(weights), published_at=1000.0 + 420.0)
    ]
    (point,) = held_out(tmp_path, versions, 1000.0, 1, 1, ["push_to_target"], registry)
    assert point["version"] == "v0003" and point["t_s"] == 420.0
    assert point["training_step"] == 450
    assert point["seeds"] == [heldout_seed(0)]  # fleet eval's held-out set, not training seeds
    result = point["tasks"]["push_to_target"]  # an untrained version holds still
    assert (result["successes"], result["episodes"]) == (0, 1)
    assert result["ci95"][0] == 0.0 and 0.5 < result["ci95"][1] < 1.0
    # Stored with the version as `fleet eval` stores it: manifest file and registry record.
    stored = registry.version("v0003").evaluation
    assert stored["scores"]["v0003"]["push_to_target"] == result
    on_disk = Manifest.from_json(manifest_path.read_text())
    assert on_disk.evaluation == stored and on_disk.sha256 == manifest.sha256

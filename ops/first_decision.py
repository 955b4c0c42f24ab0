"""Does a policy read the scene where the scene decides the motion?

Why: a behaviour-cloned policy can fit its demonstrations well step by step and still fail
every episode. Fed a demonstration's own observations, most of its targets are easy: the
arm keeps going where the joint positions already show it going. The hard targets are at
the start of an episode, where only the camera frames tell where the object is and so
where the arm must turn. This probe measures those: for each demonstration of a task, at
the given steps, the chunk's last target the model predicts against the demonstration's
own target that many steps ahead, per joint, as offsets from the current position:

- `demo_std` / `model_std`: how much the demonstrations' offsets / the model's vary
  across scenes (a model that ignores the frames predicts the same offset everywhere);
- `corr`: their correlation across scenes (1 = it turns where the scene says);
- `err` / `hold_err`: mean absolute error of the model, and of holding still (rad).

Run: .venv/bin/python ops/first_decision.py --data var/ceiling --load model.safetensors
         --task place_cube [--steps 0,5] [--set KEY=JSON ...]
(--data and --set as ops/offline_ceiling.py recorded and trained them; the model's action
scale is measured on that data as the ceiling measured it). Last line: one JSON object
{"task", "episodes", "steps": {step: {joint: figures}}}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers.sim.mujoco.tasks import MUJOCO_TASKS
from fleet.common.policy.config import parse_overrides, policy_config
from fleet.common.policy.model import UnifiedPolicy
from fleet.common.policy.weights import load_state_bytes
from learner.sampler import EpisodeSampler, SamplerConfig, decode_jpegs
from learner.store import EpisodeStore
from protos.joint_layout import JOINT_NAMES


def probe(
    model: UnifiedPolicy, store: EpisodeStore, task: str, steps: Sequence[int]
) -> dict[str, Any]:
    """The figures above for `model` on every complete episode of `task` in `store`."""
    cams = model.config.cameras
    task_id = torch.tensor([model.task_index(task)])
    k = model.config.chunk_len
    rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in steps}
    model.eval()
    episodes = 0
    for ref in store.episodes(complete_only=True):
        if store.read_episode(ref, frames=False).attrs.get("task") != task:
            continue
        episodes += 1
        ep = store.read_episode(ref)
        q = np.asarray(ep.joint_pos[:], np.float32)
        action = np.asarray(ep.action[:], np.float32)
        for s in steps:
            if s >= len(q):
                continue
            images = np.stack(decode_jpegs([ep.frames[c][s] for c in cams]))[None]
            with torch.no_grad():
                chunk = model(torch.from_numpy(images), torch.from_numpy(q[s : s + 1]), task_id)
            demo = action[min(s + k - 1, len(action) - 1)] - q[s]
            rows[s].append((demo, chunk.numpy()[0, -1] - q[s]))
    if not episodes:
        raise SystemExit(f"no complete episode of {task!r} in {store.root}")
    out: dict[str, Any] = {"task": task, "episodes": episodes, "steps": {}}
    for s, pairs in rows.items():
        demo = np.array([d for d, _ in pairs])
        pred = np.array([p for _, p in pairs])
        figures = {}
        for j, name in enumerate(JOINT_NAMES):
            d, p = demo[:, j], pred[:, j]
            both_vary = d.std() > 1e-6 and p.std() > 1e-6
            figures[name] = {
                "demo_std": round(float(d.std()), 4),
                "model_std": round(float(p.std()), 4),
                "corr": round(float(np.corrcoef(d, p)[0, 1]), 3) if both_vary else None,
                "err": round(float(np.abs(d - p).mean()), 4),
                "hold_err": round(float(np.abs(d).mean()), 4),
            }
        out["steps"][str(s)] = figures
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, required=True, help="offline_ceiling's --data")
    ap.add_argument("--load", type=Path, required=True, help="the model's weights (safetensors)")
    ap.add_argument("--task", default="place_cube")
    ap.add_argument("--steps", default="0,5", help="episode steps to probe, comma-separated")
    ap.add_argument("--cameras", default="overhead,front")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", nargs="*", default=[], help="PolicyConfig fields: KEY=JSON ...")
    ap.add_argument(
        "--action-scale", choices=["data", "none"], default="data", help="as the model trained"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cameras = tuple(c for c in args.cameras.split(",") if c)
    cfg = policy_config(args.preset, MUJOCO_TASKS, cameras, **parse_overrides(args.set))
    store = EpisodeStore(args.data / "store")
    if args.action_scale == "data" and not cfg.action_scale:
        sampler = EpisodeSampler(
            store,
            cameras,
            MUJOCO_TASKS,
            SamplerConfig(min_steps=1).for_model(cfg),
        )
        sampler.refresh(force=True)
        scale = sampler.action_scale(cfg.joint_lower, cfg.joint_upper)
        cfg = dataclasses.replace(cfg, action_scale=scale)
    model = UnifiedPolicy(cfg)
    load_state_bytes(model, args.load.read_bytes())
    result = probe(model, store, args.task, [int(s) for s in args.steps.split(",") if s])
    for step, figures in result["steps"].items():
        print(f"step {step}: joint  demo_std  model_std  corr  err  hold_err")
        for name, f in figures.items():
            if f["demo_std"] > 1e-3 or f["model_std"] > 1e-3:
                corr = "  -  " if f["corr"] is None else f"{f['corr']:+.2f}"
                print(
                    f"  {name:22s} {f['demo_std']:.3f} {f['model_std']:.3f} {corr} "
                    f"{f['err']:.3f} {f['hold_err']:.3f}"
                )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

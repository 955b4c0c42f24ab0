"""Trainer throughput through RLlib's LearnerGroup against a bare PyTorch loop (same model,
same batch, same Adam optimizer, same run), and sampler batches per second against what the
trainer consumes.

Why: RLlib is there to scale the same code to N learners over GPUs and nodes; on one process it
must cost little over plain torch (goal: ratio >= 0.9). The sampler (zarr reads + JPEG decode)
must keep up with the trainer (goal: >= 1x the trainer's batches per second), or training
starves on a fast learner.

Prints a few lines, and as its LAST line one JSON object with figures and goals.
Run: .venv/bin/python tests/bench/trainer.py [--updates 40] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch

from fleet.policy.config import policy_config
from fleet.policy.model import UnifiedPolicy
from learner.learner_group import build_learner_group, set_state_dict, update
from learner.sampler import EpisodeSampler, SamplerConfig
from learner.store import EpisodeStore

# Run as `python tests/bench/trainer.py`, the repository root is not on the path; the expert
# episodes are recorded by the suite's own helper (tests/expert_episodes.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.expert_episodes import CAMERAS, record_expert_episodes

TASKS = ("pick_cube", "touch_target")
GOALS = {"rllib_vs_torch_ratio_min": 0.9, "sampler_vs_trainer_x_min": 1.0}


def _rate(step: Callable[[], object], n: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = EpisodeStore(Path(tmp) / "store")
            for i, task in enumerate(TASKS):
                record_expert_episodes(store, task=task, episodes=1, seed=10 + i)
            cfg = SamplerConfig(
                batch_size=args.batch_size, min_steps=1, max_samples_per_insert=1e12
            )
            sampler = EpisodeSampler(store, CAMERAS, TASKS, cfg)
            sampler.refresh(force=True)
            batch = sampler.sample()

            pcfg = policy_config(args.preset, TASKS, CAMERAS, chunk_len=cfg.chunk_len)
            group = build_learner_group(pcfg, lr=3e-4)
            model = UnifiedPolicy(pcfg)
            set_state_dict(group, model.state_dict())
            opt = torch.optim.Adam(model.parameters(), lr=3e-4)

            def torch_step() -> None:
                # Same per-step work as RLlib's path: numpy batch -> tensors, fwd, bwd, step.
                tb = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
                loss, _ = model.bc_loss(tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            rl, pt, sp = [], [], []
            for r in range(args.rounds):  # interleaved so drift hits both alike
                rl.append(_rate(lambda: update(group, batch), args.updates))
                pt.append(_rate(torch_step, args.updates))
                sp.append(_rate(sampler.sample, args.updates))
                print(
                    f"round {r}: rllib {rl[-1]:.1f} upd/s, torch {pt[-1]:.1f} upd/s, "
                    f"sampler {sp[-1]:.1f} batches/s",
                    flush=True,
                )
    finally:
        ray.shutdown()
    rllib, bare, samp = float(np.median(rl)), float(np.median(pt)), float(np.median(sp))
    result = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "rllib_updates_per_s": round(rllib, 2),
        "rllib_samples_per_s": round(rllib * args.batch_size, 1),
        "torch_updates_per_s": round(bare, 2),
        "torch_samples_per_s": round(bare * args.batch_size, 1),
        "rllib_vs_torch_ratio": round(rllib / bare, 3),
        "sampler_batches_per_s": round(samp, 2),
        "sampler_vs_trainer_x": round(samp / rllib, 2),
        "goals": GOALS,
        "met": {
            "rllib_vs_torch_ratio_min": rllib / bare >= GOALS["rllib_vs_torch_ratio_min"],
            "sampler_vs_trainer_x_min": samp / rllib >= GOALS["sampler_vs_trainer_x_min"],
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

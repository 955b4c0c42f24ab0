"""Trainer throughput through RLlib's LearnerGroup against a bare PyTorch loop (same model,
same batch, same Adam optimizer, same run), the model's FLOPs per update against what a bare
dense matmul reaches on the same threads, and sampler batches per second against what the
trainer consumes.

Why: RLlib is there to scale the same code to N learners over GPUs and nodes; on one process it
must cost little over plain torch (goal: ratio >= 0.9). The trainer should spend the cores on
arithmetic: its FLOP/s (FLOPs of one forward + backward, counted by
torch.utils.flop_counter.FlopCounterMode, times updates per second) against a square fp32
matmul of similar size on the same threads, measured in the same run (goal: >= 0.4; both per
CPU-second of this process, so a loaded machine does not move the ratio; per wall-second is
printed beside it). The sampler (zarr reads + JPEG decode) must keep up with the trainer
(goal: >= 1x the trainer's batches per second), or training starves on a fast learner.

Prints a few lines, and as its LAST line one JSON object with figures, goals and `met`.
Run: .venv/bin/python tests/bench/trainer.py [--updates 40] [--batch-size 32] [--preset tiny]
     .venv/bin/python tests/bench/trainer.py --preset base --batch-size 8 --updates 2 \
         --rounds 1 --warmup 1   (a base update is ~1 TFLOP: seconds each on a CPU)
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
from torch.utils.flop_counter import FlopCounterMode

from fleet.common.policy.config import policy_config
from fleet.common.policy.model import UnifiedPolicy
from learner.learner_group import build_learner_group, set_state_dict, update
from learner.sampler import EpisodeSampler, SamplerConfig
from learner.store import EpisodeStore

# Run as `python tests/bench/trainer.py`, the repository root is not on the path; the expert
# episodes are recorded by the suite's own helper (tests/expert_episodes.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.expert_episodes import CAMERAS, record_expert_episodes

TASKS = ("pick_cube", "touch_target")
GOALS = {
    "rllib_vs_torch_ratio_min": 0.9,
    "sampler_vs_trainer_x_min": 1.0,
    "trainer_vs_matmul_flops_min": 0.4,
}


def _rates(step: Callable[[], object], n: int, warmup: int = 3) -> tuple[float, float]:
    """(calls per wall-second, calls per CPU-second of this process) over `n` calls."""
    for _ in range(warmup):
        step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def _rate(step: Callable[[], object], n: int, warmup: int = 3) -> float:
    return _rates(step, n, warmup)[0]


def update_flops(model: UnifiedPolicy, batch: dict[str, np.ndarray]) -> int:
    """FLOPs of one forward + backward of the BC loss on `batch` (the optimizer step's
    elementwise work is not counted: it is a rounding error next to the convolutions)."""
    tb = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.bc_loss(tb)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def matmul_size(flops: int) -> int:
    """Side of the square matmul "of similar size": as many FLOPs as one update (2 n^3),
    within 256..2048 (past 2048 a CPU's matmul rate no longer grows), a multiple of 64."""
    n = round((flops / 2.0) ** (1.0 / 3.0) / 64.0) * 64
    return int(min(max(n, 256), 2048))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--warmup", type=int, default=3, help="untimed updates before each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the trainer's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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

            flops = update_flops(model, batch)
            n = matmul_size(flops)
            a, b = torch.randn(n, n), torch.randn(n, n)
            mm_reps = max(1, round(flops / (2 * n**3)))

            def matmul() -> None:
                for _ in range(mm_reps):
                    torch.mm(a, b)

            print(
                f"preset {args.preset}: {model.num_parameters():,} parameters, "
                f"{flops / 1e9:.2f} GFLOP per update (batch {args.batch_size}); "
                f"floor: {mm_reps} x {n}x{n} fp32 matmul, {torch.get_num_threads()} thread(s)",
                flush=True,
            )
            rl, pt, sp, rl_cpu, pt_cpu, mm, mm_cpu = [], [], [], [], [], [], []
            for r in range(args.rounds):  # interleaved so drift hits all alike
                wall, cpu = _rates(lambda: update(group, batch), args.updates, args.warmup)
                rl.append(wall)
                rl_cpu.append(cpu)
                wall, cpu = _rates(torch_step, args.updates, args.warmup)
                pt.append(wall)
                pt_cpu.append(cpu)
                wall, cpu = _rates(matmul, max(3, args.updates), 1)
                mm.append(wall * mm_reps * 2 * n**3)
                mm_cpu.append(cpu * mm_reps * 2 * n**3)
                sp.append(_rate(sampler.sample, args.updates, args.warmup))
                print(
                    f"round {r}: rllib {rl[-1]:.2f} upd/s ({rl_cpu[-1]:.2f} per CPU-s), "
                    f"torch {pt[-1]:.2f} upd/s, sampler {sp[-1]:.1f} batches/s, "
                    f"trainer {rl_cpu[-1] * flops / 1e9:.1f} GFLOP per CPU-s, "
                    f"matmul {mm_cpu[-1] / 1e9:.1f} GFLOP per CPU-s",
                    flush=True,
                )
    finally:
        ray.shutdown()
    rllib, bare, samp = float(np.median(rl)), float(np.median(pt)), float(np.median(sp))
    trainer_flops_cpu = float(np.median(rl_cpu)) * flops
    mm_flops_cpu = float(np.median(mm_cpu))
    flops_ratio = trainer_flops_cpu / mm_flops_cpu
    result = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "flops_per_update": flops,
        "matmul_n": n,
        "trainer_gflops_per_cpu_s": round(trainer_flops_cpu / 1e9, 2),
        "matmul_gflops_per_cpu_s": round(mm_flops_cpu / 1e9, 2),
        "trainer_vs_matmul_flops": round(flops_ratio, 3),
        "trainer_gflops_per_s": round(rllib * flops / 1e9, 2),
        "matmul_gflops_per_s": round(float(np.median(mm)) / 1e9, 2),
        "trainer_vs_matmul_flops_wall": round(rllib * flops / float(np.median(mm)), 3),
        "rllib_updates_per_s": round(rllib, 2),
        "rllib_samples_per_s": round(rllib * args.batch_size, 1),
        "torch_updates_per_s": round(bare, 2),
        "torch_samples_per_s": round(bare * args.batch_size, 1),
        "rllib_vs_torch_ratio": round(rllib / bare, 3),
        # per CPU-second of this process: what a loaded machine does not move
        "rllib_vs_torch_ratio_cpu": round(float(np.median(rl_cpu)) / float(np.median(pt_cpu)), 3),
        "sampler_batches_per_s": round(samp, 2),
        "sampler_vs_trainer_x": round(samp / rllib, 2),
        "goals": GOALS,
        "met": {
            "rllib_vs_torch_ratio_min": rllib / bare >= GOALS["rllib_vs_torch_ratio_min"],
            "sampler_vs_trainer_x_min": samp / rllib >= GOALS["sampler_vs_trainer_x_min"],
            "trainer_vs_matmul_flops_min": flops_ratio >= GOALS["trainer_vs_matmul_flops_min"],
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

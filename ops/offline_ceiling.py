"""Offline ceiling: behaviour cloning on a fixed set of expert episodes, evaluated held out.

Why: the fleet's learning curve mixes two limits, what the model and method can learn at all
and how fast the fleet loop gets data and updates through on a small machine. This script
takes the second away: the scripted expert records a fixed set of demonstrations once (cached
in an EpisodeStore under --data, reused by later runs), the unified model trains on them for
as many updates as asked, and every --eval-every updates it is run on scenes no demonstration
used, on the MuJoCo cell behind the SDKs through the cell's own ControlLoop (chunk blending,
safety gate), with no operator takeovers.

Training is the learner's: the same EpisodeSampler batches and UnifiedPolicy.bc_loss, with
plain torch Adam instead of the RLlib LearnerGroup (same loss and optimizer; the wrapper's
overhead is not what this measures). Demonstrations and evaluations come from cells with
different actor seeds, so their scenes differ (ControlLoop's episode seeds are 32-bit hashes
of the actor seed and the episode index).

Last line: one JSON object {"config", "demos", "evals": [{"updates", "train_s", per task
{"successes", "episodes", "mean_final_reward"}}], "updates_per_s", ...}.
Run: .venv/bin/python ops/offline_ceiling.py --data var/ceiling --demos 20 --updates 3000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from actors.config import ActorConfig
from actors.control_loop import ControlLoop
from actors.inference import InlineInference
from drivers.sim.mujoco import EPISODE_TIME_S, MUJOCO_TASKS
from drivers.sim.sdk_cell import make_sdk_sim_cell
from fleet.policy.config import PolicyConfig, parse_overrides, policy_config
from fleet.policy.model import UnifiedPolicy
from fleet.policy.runtime import PolicyRunner
from fleet.policy.weights import load_state_bytes, state_dict_to_bytes
from learner.chunks import decode_chunk
from learner.sampler import EpisodeSampler, SamplerConfig
from learner.store import EpisodeStore
from protos.fleetlearn.v1 import trajectory_pb2

log = logging.getLogger("offline_ceiling")

DEMO_SEED = 101  # actor seed of the demonstrating cell
EVAL_SEED = 9_000_001  # actor seed of the evaluating cell: other scenes than the demos'
CAMERAS = ("overhead", "front")  # what `fleet up` cells record


@dataclass
class EpisodeOutcome:
    task: str
    success: bool
    steps: int
    final_reward: float
    intervened: bool


@dataclass
class _Sink:
    """The ControlLoop's uplink: decodes chunks as ingest does, optionally stores them, and
    stops the loop once every task in `tasks` has `per_task` finished episodes (after a
    fault-cut episode the round robin shifts; a task's extra episodes are not counted)."""

    per_task: int
    tasks: Sequence[str]
    stop: threading.Event
    store: EpisodeStore | None = None
    on_episode: Callable[[EpisodeOutcome], None] | None = None
    outcomes: list[EpisodeOutcome] = field(default_factory=list)
    faults: int = 0  # episodes a cell fault cut short (a starved servo peer): not counted
    _steps: int = 0
    _intervened: bool = False

    def submit(self, chunk: trajectory_pb2.StepChunk) -> bool:
        decoded = decode_chunk(chunk, known_tasks=None)
        if self.store is not None:
            self.store.append(decoded)
        self._steps += len(decoded.reward)
        self._intervened |= bool(np.any(decoded.intervention))
        if chunk.last and chunk.outcome.reason in ("fault", "aborted"):
            self.faults += 1
            self._steps, self._intervened = 0, False
            log.warning(
                "episode %s cut short (%s); not counted", chunk.episode_id, chunk.outcome.reason
            )
        elif chunk.last:
            outcome = EpisodeOutcome(
                task=decoded.task,
                success=bool(chunk.outcome.success),
                steps=self._steps,
                final_reward=float(decoded.reward[-1]) if len(decoded.reward) else 0.0,
                intervened=self._intervened,
            )
            self._steps, self._intervened = 0, False
            if self._count(outcome.task) < self.per_task:
                self.outcomes.append(outcome)
                if self.on_episode is not None:
                    self.on_episode(outcome)
            if all(self._count(t) >= self.per_task for t in self.tasks):
                self.stop.set()
        return True

    def _count(self, task: str) -> int:
        return sum(o.task == task for o in self.outcomes)


class _OneVersion:
    def __init__(self, runner: PolicyRunner | None) -> None:
        self._runner = runner

    def take_new(self) -> PolicyRunner | None:
        runner, self._runner = self._runner, None
        return runner


def run_episodes(
    *,
    seed: int,
    episodes_per_task: int,
    tasks: Sequence[str],
    cameras: Sequence[str],
    runner: PolicyRunner | None,
    store: EpisodeStore | None = None,
    lookahead: int | None = None,
    on_episode: Callable[[EpisodeOutcome], None] | None = None,
) -> list[EpisodeOutcome]:
    """Episodes round robin over `tasks` on a fresh MuJoCo SDK cell through ControlLoop.

    runner None: the scripted expert drives (demonstrations); else the policy alone.
    """
    # No watchdog: it measures wall time, and in virtual time (realtime_factor 0) a slow
    # tick on a loaded machine would make it hold the arms mid-episode.
    cell = make_sdk_sim_cell(
        f"ceiling-{seed}",
        seed=seed,
        cameras=cameras,
        realtime_factor=0.0,
        takeover_prob=0.0,
        watchdog=False,
    )
    stop = threading.Event()
    sink = _Sink(episodes_per_task, tasks, stop, store, on_episode)
    try:
        loop = ControlLoop(
            ActorConfig(
                cell_id=f"ceiling-{seed}",
                learner_address="127.0.0.1:1",
                tasks=tuple(tasks),
                max_episode_s=max(EPISODE_TIME_S[t] for t in tasks),
                seed=seed,
            ),
            cell.hardware,
            cell.scene,
            cell.operator,
            cell.clock,
            sink,
            _OneVersion(runner),
            inference=InlineInference(),
            shadow_inference=InlineInference(),
            lookahead=lookahead,
        )
        loop.run(stop)
        if runner is not None and loop.stats["interventions"]:
            raise RuntimeError("the operator drove an evaluation episode")
    finally:
        cell.close()
    return sink.outcomes


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate (sensible at 0 and n successes)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(outcomes: Sequence[EpisodeOutcome]) -> dict[str, dict[str, float | int]]:
    """Per task: successes / episodes with a 95 % Wilson interval, mean final reward."""
    out: dict[str, dict[str, float | int]] = {}
    for task in sorted({o.task for o in outcomes}):
        mine = [o for o in outcomes if o.task == task]
        wins = sum(o.success for o in mine)
        low, high = wilson(wins, len(mine))
        out[task] = {
            "successes": wins,
            "episodes": len(mine),
            "low": round(low, 3),
            "high": round(high, 3),
            "mean_final_reward": round(float(np.mean([o.final_reward for o in mine])), 3),
            "mean_steps": round(float(np.mean([o.steps for o in mine])), 1),
        }
    return out


def ensure_demos(
    data: Path, per_task: int, tasks: Sequence[str], cameras: Sequence[str], progress: Progress
) -> EpisodeStore:
    """The demonstration store under `data`, recorded once (more are added if asked)."""
    store = EpisodeStore(data / "store")
    have = len(store.episodes(complete_only=True))
    want = per_task * len(tasks)
    if have >= want:
        return store
    if have:
        raise SystemExit(
            f"{data}: holds {have} demonstrations, {want} asked; use a new --data directory"
        )
    bar = progress.add_task("expert demonstrations", total=want, note="")
    outcomes = run_episodes(
        seed=DEMO_SEED,
        episodes_per_task=per_task,
        tasks=tasks,
        cameras=cameras,
        runner=None,
        store=store,
        on_episode=lambda o: progress.advance(bar),
    )
    (data / "demos.json").write_text(json.dumps(summarize(outcomes)))
    return store


def _tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, required=True, help="demonstration cache directory")
    ap.add_argument("--demos", type=int, default=20, help="expert episodes per task")
    ap.add_argument("--tasks", default=",".join(MUJOCO_TASKS))
    ap.add_argument("--cameras", default=",".join(CAMERAS), help="cameras the policy sees")
    ap.add_argument("--updates", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=1000, help="updates between evaluations")
    ap.add_argument("--eval-scenes", type=int, default=10, help="held-out scenes per task")
    ap.add_argument(
        "--eval-seed",
        type=int,
        default=EVAL_SEED,
        help=f"actor seed of the evaluating cell (held out: {EVAL_SEED}; the demos': {DEMO_SEED})",
    )
    ap.add_argument(
        "--eval-demo-scenes",
        action="store_true",
        help="also run the policy on the scenes it was shown (underfit or overfit?)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument(
        "--lr-schedule", choices=["constant", "cosine"], default="constant", help="over --updates"
    )
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", nargs="*", default=[], help="PolicyConfig fields: KEY=JSON ...")
    ap.add_argument("--lookahead", type=int, default=None, help="ControlLoop lookahead ticks")
    ap.add_argument("--seed", type=int, default=0, help="training seed (init, batches)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument(
        "--expert-baseline", action="store_true", help="also run the expert on the held-out scenes"
    )
    ap.add_argument(
        "--save", type=Path, default=None, help="write the weights here (safetensors) at each eval"
    )
    ap.add_argument(
        "--load", type=Path, default=None, help="start from these weights (--updates 0: eval only)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    cameras = tuple(c for c in args.cameras.split(",") if c)
    overrides = parse_overrides(args.set)
    cfg: PolicyConfig = policy_config(args.preset, MUJOCO_TASKS, cameras, **overrides)
    sampler_cfg = SamplerConfig(
        batch_size=args.batch_size,
        chunk_len=cfg.chunk_len,
        min_steps=1,
        max_samples_per_insert=1e12,
    )
    result: dict[str, Any] = {
        "config": cfg.to_dict(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "evals": [],
    }
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with progress:
        t0 = time.monotonic()
        store = ensure_demos(args.data, args.demos, tasks, CAMERAS, progress)
        result["demo_collect_s"] = round(time.monotonic() - t0, 1)
        sampler = EpisodeSampler(store, cameras, MUJOCO_TASKS, sampler_cfg, seed=args.seed)
        sampler.refresh(force=True)
        result["demos"] = {
            "episodes": sampler.episodes_available,
            "steps": sampler.steps_available,
            "expert": json.loads((args.data / "demos.json").read_text()),
        }
        if args.expert_baseline:
            bar = progress.add_task(
                "expert on held-out scenes", total=args.eval_scenes * len(tasks), note=""
            )
            result["expert_held_out"] = summarize(
                run_episodes(
                    seed=EVAL_SEED,
                    episodes_per_task=args.eval_scenes,
                    tasks=tasks,
                    cameras=cameras,
                    runner=None,
                    on_episode=lambda o: progress.advance(bar),
                )
            )
            progress.console.print(json.dumps({"expert_held_out": result["expert_held_out"]}))
        model = UnifiedPolicy(cfg)
        if args.load is not None:
            load_state_bytes(model, args.load.read_bytes())
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, args.updates), args.lr * 0.05)
            if args.lr_schedule == "cosine"
            else None
        )
        train_bar = progress.add_task("updates", total=args.updates, note="")
        train_s = 0.0
        losses: list[float] = [float("nan")]

        def evaluate(u: int) -> None:
            model.eval()
            if args.save is not None:  # at every evaluation: a stopped run keeps its weights
                args.save.parent.mkdir(parents=True, exist_ok=True)
                args.save.write_bytes(state_dict_to_bytes(model))
            runner = PolicyRunner(model, f"u{u}")
            bar = progress.add_task(
                f"held-out eval @ {u}", total=args.eval_scenes * len(tasks), note=""
            )
            t_eval = time.monotonic()
            outcomes = run_episodes(
                seed=args.eval_seed,
                episodes_per_task=args.eval_scenes,
                tasks=tasks,
                cameras=cameras,
                runner=runner,
                lookahead=args.lookahead,
                on_episode=lambda o: progress.advance(bar),
            )
            if args.eval_demo_scenes:
                seen = run_episodes(
                    seed=DEMO_SEED,
                    episodes_per_task=min(args.eval_scenes, args.demos),
                    tasks=tasks,
                    cameras=cameras,
                    runner=runner,
                    lookahead=args.lookahead,
                )
            point = {
                "updates": u,
                "train_s": round(train_s, 1),
                "eval_s": round(time.monotonic() - t_eval, 1),
                "loss": round(float(np.mean(losses[-50:])), 5),
                "tasks": summarize(outcomes),
            }
            if args.eval_demo_scenes:
                point["demo_scenes"] = summarize(seen)
            result["evals"].append(point)
            progress.console.print(json.dumps(point))

        if args.updates == 0:
            evaluate(0)
        for u in range(1, args.updates + 1):
            t = time.monotonic()
            model.train()
            loss, metrics = model.bc_loss(_tensors(sampler.sample()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            train_s += time.monotonic() - t
            losses.append(float(metrics["loss"]))
            progress.update(train_bar, advance=1, note=f"loss {np.mean(losses[-50:]):.4f}")
            if u % args.eval_every == 0 or u == args.updates:
                evaluate(u)
        result["updates_per_s"] = round(args.updates / max(train_s, 1e-9), 2)
        result["parameters"] = model.num_parameters()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline ceiling: behaviour cloning on a fixed set of expert episodes, evaluated held out.

Why: the fleet's learning curve mixes two limits, what the model and method can learn at all
and how fast the fleet loop gets data and updates through on a small machine. This script
takes the second away: the scripted expert records a fixed set of demonstrations once (cached
in an EpisodeStore under --data, reused by later runs), the unified model trains on them for
as many updates as asked, and every --eval-every updates it is evaluated as `fleet eval`
evaluates a version (actors.evaluate.evaluate): lockstep MuJoCo cells behind the SDKs, the
cell's own ControlLoop (chunk blending, safety gate), no takeovers, on `fleet eval`'s
held-out scenes (fleet.common.scenes.heldout_seed: never a training seed, so never a
demonstration's scene).

Training is the learner's: the same EpisodeSampler batches and UnifiedPolicy.bc_loss, with
plain torch Adam instead of the RLlib LearnerGroup (same loss and optimizer; the wrapper's
overhead is not what this measures). --eval-demo-scenes also runs the policy, through the
same lockstep evaluation cells, on the scenes the demonstrations were recorded on (training
seeds by design: it tells underfitting from overfitting); those figures are labelled
"demo_scenes" and are not held out.

Last line: one JSON object {"config", "demos", "evals": [{"updates", "train_s", "tasks":
per task {"successes", "episodes", "success_rate", "ci95", "mean_progress"}}],
"updates_per_s", ...}.
Run: .venv/bin/python ops/offline_ceiling.py --data var/ceiling --demos 20 --updates 3000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from actors.config import ActorConfig
from actors.control_loop import ControlLoop, episode_seed
from actors.evaluate import PolicySpec, evaluate, run_jobs, version_of_model
from actors.inference import InlineInference
from drivers.sim.mujoco import EPISODE_TIME_S, MUJOCO_TASKS
from drivers.sim.sdk_cell import make_sdk_sim_cell
from fleet.common.evaluation import EpisodeRecord, score
from fleet.common.policy.config import PolicyConfig, parse_overrides, policy_config
from fleet.common.policy.model import UnifiedPolicy
from fleet.common.policy.weights import load_state_bytes, state_dict_to_bytes
from learner.chunks import decode_chunk
from learner.sampler import EpisodeSampler, SamplerConfig
from learner.store import EpisodeStore
from protos.fleetlearn.v1 import trajectory_pb2

log = logging.getLogger("offline_ceiling")

DEMO_SEED = 101  # actor seed of the demonstrating cell (its scenes are training seeds)
CAMERAS = ("overhead", "front")  # what `fleet up` cells record


@dataclass
class _Sink:
    """The demonstrating ControlLoop's uplink: decodes chunks as ingest does, optionally
    stores them, and stops the loop once every task in `tasks` has `per_task` finished
    episodes (after a fault-cut episode the round robin shifts; a task's extra episodes are
    not counted). Each counted episode becomes an EpisodeRecord of policy "expert" with its
    scene seed (`seed_of` the loop's episode index: one index per episode, faulted or not)."""

    per_task: int
    tasks: Sequence[str]
    stop: threading.Event
    store: EpisodeStore | None = None
    on_episode: Callable[[EpisodeRecord], None] | None = None
    seed_of: Callable[[int], int] = lambda index: index
    records: list[EpisodeRecord] = field(default_factory=list)
    faults: int = 0  # episodes a cell fault cut short (a starved servo peer): not counted
    _episodes: int = 0
    _steps: int = 0
    _intervention_steps: int = 0

    def submit(self, chunk: trajectory_pb2.StepChunk) -> bool:
        decoded = decode_chunk(chunk, known_tasks=None)
        if self.store is not None:
            self.store.append(decoded)
        self._steps += len(decoded.reward)
        self._intervention_steps += int(np.count_nonzero(decoded.intervention))
        if not chunk.last:
            return True
        seed = self.seed_of(self._episodes)
        self._episodes += 1
        steps, intervention_steps = self._steps, self._intervention_steps
        self._steps = self._intervention_steps = 0
        if chunk.outcome.reason in ("fault", "aborted"):
            self.faults += 1
            log.warning(
                "episode %s cut short (%s); not counted", chunk.episode_id, chunk.outcome.reason
            )
            return True
        record = EpisodeRecord(
            policy="expert",
            task=decoded.task,
            seed=seed,
            success=bool(chunk.outcome.success),
            reason=chunk.outcome.reason,
            steps=steps,
            reward=round(float(decoded.reward[-1]) if len(decoded.reward) else 0.0, 6),
            intervention_steps=intervention_steps,
        )
        if self._count(record.task) < self.per_task:
            self.records.append(record)
            if self.on_episode is not None:
                self.on_episode(record)
        if all(self._count(t) >= self.per_task for t in self.tasks):
            self.stop.set()
        return True

    def _count(self, task: str) -> int:
        return sum(r.task == task for r in self.records)


def record_demos(
    *,
    episodes_per_task: int,
    tasks: Sequence[str],
    cameras: Sequence[str],
    store: EpisodeStore | None,
    seed: int = DEMO_SEED,
    on_episode: Callable[[EpisodeRecord], None] | None = None,
) -> list[EpisodeRecord]:
    """The scripted expert's episodes, round robin over `tasks`, on a fresh MuJoCo SDK cell
    through ControlLoop (the path a fleet cell records on), stored in `store`."""
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
    sink = _Sink(episodes_per_task, tasks, stop, store, on_episode, lambda i: episode_seed(seed, i))
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
            None,  # no policy: the scripted expert drives every step
            inference=InlineInference(),
            shadow_inference=InlineInference(),
        )
        loop.run(stop)
    finally:
        cell.close()
    return sink.records


def scores_json(records: Sequence[EpisodeRecord], policy: str) -> dict[str, dict[str, Any]]:
    """Per task: `policy`'s figures as `fleet eval` stores them (fleet.common.evaluation.score)."""
    return {task: s.to_dict() for task, s in score(records).get(policy, {}).items()}


def ensure_demos(
    data: Path, per_task: int, tasks: Sequence[str], cameras: Sequence[str], progress: Progress
) -> EpisodeStore:
    """The demonstration store under `data`, recorded once; demos.json keeps each episode's
    record (task, scene seed, outcome) beside it."""
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
    records = record_demos(
        episodes_per_task=per_task,
        tasks=tasks,
        cameras=cameras,
        store=store,
        on_episode=lambda r: progress.advance(bar),
    )
    (data / "demos.json").write_text(json.dumps({"episodes": [asdict(r) for r in records]}))
    return store


def load_demo_records(data: Path) -> list[EpisodeRecord]:
    """The demonstrations' records from demos.json (SystemExit naming the fix if absent)."""
    try:
        saved = json.loads((data / "demos.json").read_text())
        return [EpisodeRecord(**r) for r in saved["episodes"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(
            f"{data}/demos.json has no demonstration records ({exc!r}): it is from an older "
            "offline_ceiling; record again into a new --data directory"
        ) from None


def demo_scenes(
    records: Sequence[EpisodeRecord], tasks: Sequence[str], per_task: int
) -> list[tuple[str, int]]:
    """(task, seed) of the first `per_task` demonstrated scenes of each of `tasks`."""
    out: list[tuple[str, int]] = []
    for task in tasks:
        out += [(task, r.seed) for r in records if r.task == task][:per_task]
    return out


def _tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, required=True, help="demonstration cache directory")
    ap.add_argument("--demos", type=int, default=20, help="expert episodes per task")
    ap.add_argument(
        "--tasks",
        default=",".join(MUJOCO_TASKS),
        help="tasks to record demonstrations of, train on and evaluate (the model knows all)",
    )
    ap.add_argument("--cameras", default=",".join(CAMERAS), help="cameras the policy sees")
    ap.add_argument("--updates", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=1000, help="updates between evaluations")
    ap.add_argument("--eval-scenes", type=int, default=10, help="held-out scenes per task")
    ap.add_argument(
        "--eval-seed-start",
        type=int,
        default=0,
        help="first held-out scene index (fleet eval's --seed-start: heldout_seed(i))",
    )
    ap.add_argument("--eval-workers", type=int, default=1, help="evaluation worker processes")
    ap.add_argument(
        "--eval-demo-scenes",
        action="store_true",
        help="also run the policy on the demonstrations' own scenes (training seeds, labelled "
        "demo_scenes; underfit or overfit?)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--hold-after-success",
        action="store_true",
        help="train chunk targets past a successful episode's end as holding its last action"
        " (the learner's flag)",
    )
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument(
        "--lr-schedule", choices=["constant", "cosine"], default="constant", help="over --updates"
    )
    ap.add_argument(
        "--action-scale",
        choices=("data", "none"),
        default="data",
        help="data (as the learner does by default): measure PolicyConfig.action_scale on the"
        " demonstrations (per-joint offset RMS); none: the joint-limit scale (1.0 per joint)",
    )
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", nargs="*", default=[], help="PolicyConfig fields: KEY=JSON ...")
    ap.add_argument("--seed", type=int, default=0, help="training seed (init, batches)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument(
        "--expert-baseline",
        action="store_true",
        help="also run the expert on the held-out scenes (at the first evaluation)",
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
    # Train on --tasks only: the cache may hold every task's demonstrations (the model's
    # vocabulary stays all of MUJOCO_TASKS, so weights are comparable across runs).
    sampler_cfg = SamplerConfig(
        batch_size=args.batch_size,
        min_steps=1,
        max_samples_per_insert=1e12,
        task_weights=tuple((t, 1.0 if t in tasks else 0.0) for t in MUJOCO_TASKS),
        hold_after_success=args.hold_after_success,
    ).for_model(cfg)
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
    with progress, tempfile.TemporaryDirectory(prefix="ceiling-versions-") as versions_dir:
        t0 = time.monotonic()
        store = ensure_demos(args.data, args.demos, tasks, CAMERAS, progress)
        result["demo_collect_s"] = round(time.monotonic() - t0, 1)
        demos = load_demo_records(args.data)
        sampler = EpisodeSampler(store, cameras, MUJOCO_TASKS, sampler_cfg, seed=args.seed)
        sampler.refresh(force=True)
        result["demos"] = {
            "episodes": sampler.episodes_available,
            "steps": sampler.steps_available,
            "expert": scores_json(demos, "expert"),
        }
        if args.action_scale == "data" and not cfg.action_scale:
            scale = sampler.action_scale(cfg.joint_lower, cfg.joint_upper)
            cfg = dataclasses.replace(cfg, action_scale=scale)
            result["config"] = cfg.to_dict()
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

        def run_eval(u: int) -> None:
            model.eval()
            if args.save is not None:  # at every evaluation: a stopped run keeps its weights
                args.save.parent.mkdir(parents=True, exist_ok=True)
                args.save.write_bytes(state_dict_to_bytes(model))
            version = version_of_model(model, f"u{u}", Path(versions_dir), training_step=u)
            baselines = ("expert",) if args.expert_baseline and not result["evals"] else ()
            bar = progress.add_task(
                f"held-out eval @ {u}",
                total=args.eval_scenes * len(tasks) * (1 + len(baselines)),
                note="",
            )
            t_eval = time.monotonic()
            held_out = evaluate(
                version,
                tasks,
                args.eval_scenes,
                args.eval_seed_start,
                "mujoco",
                baselines,
                args.eval_workers,
                progress=lambda _record: progress.advance(bar),
            )
            point: dict[str, Any] = {
                "updates": u,
                "train_s": round(train_s, 1),
                "eval_s": round(time.monotonic() - t_eval, 1),
                "loss": round(float(np.mean(losses[-50:])), 5),
                "seeds": list(held_out.seeds),  # fleet eval's held-out scenes
                "tasks": scores_json(held_out.records, version.version_id),
            }
            if baselines:
                result["expert_held_out"] = scores_json(held_out.records, "expert")
            if args.eval_demo_scenes:
                scenes = demo_scenes(demos, tasks, min(args.eval_scenes, args.demos))
                seen_bar = progress.add_task(f"demo-scene eval @ {u}", total=len(scenes), note="")
                seen: list[EpisodeRecord] = []

                def take(record: EpisodeRecord) -> None:
                    seen.append(record)
                    progress.advance(seen_bar)

                run_jobs(
                    "mujoco",
                    cameras,
                    [PolicySpec.of_version(version)],
                    [(version.version_id, task, seed) for task, seed in scenes],
                    take,
                )
                point["demo_scenes"] = {  # training seeds: not held out
                    "seeds": [seed for _task, seed in scenes],
                    "tasks": scores_json(seen, version.version_id),
                }
            result["evals"].append(point)
            progress.console.print(json.dumps(point))

        if args.updates == 0:
            run_eval(0)
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
                run_eval(u)
        result["updates_per_s"] = round(args.updates / max(train_s, 1e-9), 2)
        result["parameters"] = model.num_parameters()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fleet learner`: the central learner on Ray (gateway + trainer) until SIGINT/SIGTERM.

Ray runs each central component as an actor: the gRPC gateway (ingest + policy
distribution) and the trainer (sampler, RLlib LearnerGroup, publisher). `ray.init()` is
local by default; `--ray-address` joins a cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import ray

from fleet.logs import setup_logging
from fleet.registry import Registry
from learner.gateway import Gateway
from learner.sampler import SamplerConfig
from learner.trainer import Trainer, TrainerConfig

log = logging.getLogger("learner")


class GatewayActor(Gateway):
    """Gateway as a Ray actor; sets up logging in the worker process first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        setup_logging()
        super().__init__(*args, **kwargs)


class TrainerActor(Trainer):
    """Trainer as a Ray actor; sets up logging in the worker process first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        setup_logging()
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet learner",
        description="Run the central learner: gRPC ingest + policy service, trainer, publisher.",
    )
    p.add_argument("--redis-url", required=True, help="Redis holding the fleet registry")
    p.add_argument(
        "--data-dir",
        type=Path,
        required=True,
        help="where the episode store (store/) and versions (versions/) live",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the gateway binds")
    p.add_argument("--port", type=int, default=50051, help="gateway port (0 = any free port)")
    p.add_argument("--tasks", required=True, help="comma-separated task names the model learns")
    p.add_argument("--cameras", required=True, help="comma-separated camera names, model order")
    p.add_argument("--preset", default="tiny", help="model preset: tiny, base, large")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--publish-every", type=int, default=200, help="publish a new version every N updates"
    )
    p.add_argument("--min-steps", type=int, default=200, help="stored steps before training starts")
    p.add_argument(
        "--max-samples-per-insert",
        type=float,
        default=64.0,
        help="rate limit: sampled steps per stored step before the trainer waits",
    )
    p.add_argument("--num-learners", type=int, default=0, help="remote RLlib learners (0=local)")
    p.add_argument("--num-gpus-per-learner", type=float, default=0.0)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument(
        "--rollout",
        default="immediate",
        choices=["immediate"],
        help="how new versions reach the cells",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    tasks = tuple(t for t in args.tasks.split(",") if t)
    cameras = tuple(c for c in args.cameras.split(",") if c)
    data_dir: Path = args.data_dir.resolve()
    store_root, versions_dir = data_dir / "store", data_dir / "versions"
    store_root.mkdir(parents=True, exist_ok=True)

    registry = Registry(args.redis_url)
    registry.set_rollout_mode(args.rollout)
    registry.set_learner_stats(state="starting", pid=os.getpid())
    if args.ray_address:
        ray.init(address=args.ray_address, include_dashboard=False)
    else:
        ray.init(
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=256 << 20,
        )
    # After ray.init: Ray installs its own SIGTERM handler, which would kill us without the
    # orderly stop below (final store totals, trainer state).
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    gateway = ray.remote(num_cpus=0, max_concurrency=4)(GatewayActor).remote(
        store_root, args.redis_url, tasks, host=args.host, port=args.port
    )
    port = ray.get(gateway.start.remote())
    trainer_cfg = TrainerConfig(
        tasks=tasks,
        cameras=cameras,
        preset=args.preset,
        lr=args.lr,
        publish_every_updates=args.publish_every,
        num_learners=args.num_learners,
        num_gpus_per_learner=args.num_gpus_per_learner,
        torch_threads=args.torch_threads,
        rollout_mode=args.rollout,
        sampler=SamplerConfig(
            batch_size=args.batch_size,
            min_steps=args.min_steps,
            max_samples_per_insert=args.max_samples_per_insert,
        ),
    )
    trainer = ray.remote(num_cpus=1, max_concurrency=2)(TrainerActor).remote(
        trainer_cfg, store_root, versions_dir, args.redis_url
    )
    ray.get(trainer.start.remote())
    registry.set_learner_stats(state="ready", port=port)
    log.info(
        "learner ready: gateway on %s:%d, tasks %s, cameras %s, preset %s",
        args.host,
        port,
        ",".join(tasks),
        ",".join(cameras),
        args.preset,
    )
    stop.wait()

    log.info("learner stopping")
    ray.get(trainer.stop.remote())
    totals = ray.get(gateway.totals.remote())
    stats = ray.get(trainer.stats.remote())
    registry.set_learner_stats(
        state="stopped", store_steps=totals["steps"], store_episodes=totals["episodes"], **stats
    )
    ray.get(gateway.stop.remote())
    ray.shutdown()
    log.info(
        "learner stopped: store holds %d steps in %d episodes, %s updates",
        totals["steps"],
        totals["episodes"],
        stats["updates"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

from fleet.common import metrics
from fleet.common.config_cli import add_model_arguments, parse_model
from fleet.common.logs import setup_logging
from fleet.common.policy.config import parse_overrides, policy_config
from fleet.common.supervision import kill_group_when_gone, stop_with_supervisor
from fleet.control.connection import redis_url_or_env
from fleet.control.lease import LEASE_FILE, Lease, hold_lease
from fleet.control.registry import Registry
from learner.admission import StreamLimits
from learner.auth import TokensFile
from learner.chunks import DecodedChunk
from learner.gateway import Gateway
from learner.options import LearnerOptions
from learner.sampler import SamplerConfig, parse_task_weights
from learner.store import EpisodeSummary
from learner.trainer import Trainer, TrainerConfig

log = logging.getLogger("learner")


# Metrics: each Ray actor keeps its numbers in its own process (stats() plus histograms)
# and renders them with metrics_text(); the driver re-exposes them on --metrics-port. One
# scrape target per learner, wherever Ray placed the actors, and no extra port per actor.


class GatewayActor(Gateway):
    """Gateway as a Ray actor; sets up logging in the worker process first. It acks only
    while the learner holds its lease."""

    def __init__(self, *args: Any, lease: Lease, **kwargs: Any) -> None:
        setup_logging()
        super().__init__(*args, alive=lease.alive, **kwargs)
        self.episodes_completed = 0
        metrics.register(
            metrics.StatsCollector(
                lambda: {**self.stats(), "episodes_completed": self.episodes_completed},
                metrics.INGEST_STATS,
            )
        )

    def _on_episode_end(self, chunk: DecodedChunk, summary: EpisodeSummary) -> None:
        self.episodes_completed += 1
        super()._on_episode_end(chunk, summary)

    def metrics_text(self) -> str:
        return metrics.fleet_text()


class TrainerActor(Trainer):
    """Trainer as a Ray actor; sets up logging in the worker process first. It publishes
    only while the learner holds its lease."""

    def __init__(self, *args: Any, lease: Lease, **kwargs: Any) -> None:
        setup_logging()
        super().__init__(*args, alive=lease.alive, **kwargs)
        metrics.register(
            metrics.StatsCollector(
                self.stats,
                metrics.TRAINER_STATS,
                info=lambda: (
                    "fleet_trainer_latest_version",
                    "the newest policy version the trainer published",
                    {"version": str(self.stats()["latest_version"]) or "none"},
                ),
            )
        )

    def metrics_text(self) -> str:
        return metrics.fleet_text()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet learner",
        description="Run the central learner: gRPC ingest + policy service, trainer, publisher.",
    )
    add_model_arguments(p, LearnerOptions)
    return p


def _security_problem(args: LearnerOptions) -> str | None:
    """Why these arguments may not start a learner (secure by default), or None."""
    if args.insecure:
        return None
    missing = [
        flag
        for flag, value in (("--tls-dir", args.tls_dir), ("--tokens-file", args.tokens_file))
        if value is None
    ]
    if missing:
        return (
            f"fleet learner: {' and '.join(missing)} missing; the learner serves TLS with a "
            "tokens file (the allow-list of cells) unless --insecure is given"
        )
    try:
        TokensFile(args.tokens_file)
    except (OSError, ValueError) as exc:
        return f"fleet learner: tokens file unusable: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_model(parser, LearnerOptions, argv)
    try:
        policy_overrides = parse_overrides(args.policy_set)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        task_weights = parse_task_weights(args.task_weight)
    except ValueError as exc:
        parser.error(str(exc))
    fixed = sorted({"tasks", "cameras", "preset"} & set(policy_overrides))
    if fixed:
        parser.error(f"--policy-set cannot set {fixed}: use --tasks, --cameras, --preset")
    tasks = tuple(t for t in args.tasks.split(",") if t)
    cameras = tuple(c for c in args.cameras.split(",") if c)
    try:  # the preset and the settings over it, checked before anything starts
        model_config = policy_config(args.preset, tasks, cameras, **policy_overrides)
    except ValueError as exc:
        parser.error(str(exc))
    unknown = sorted({t for t, _ in task_weights} - set(tasks))
    if unknown:
        parser.error(f"--task-weight names {unknown}, not tasks of this model: {list(tasks)}")
    problem = _security_problem(args)
    if problem is not None:
        raise SystemExit(problem)
    setup_logging()
    data_dir: Path = args.data_dir.resolve()
    store_root, versions_dir = data_dir / "store", data_dir / "versions"
    store_root.mkdir(parents=True, exist_ok=True)

    # Fate-sharing: the lease is what every ack and publish checks (fleet/control/lease.py); the
    # group reaper ends the Ray processes this learner starts when it dies, and each Ray
    # worker dies with its raylet (fleet/common/supervision.py).
    lease_path = data_dir / LEASE_FILE
    hold_lease(lease_path)
    redis_url = redis_url_or_env(args.redis_url)
    registry = Registry(redis_url)
    registry.set_rollout_mode(args.rollout)
    registry.set_learner_stats(state="starting", pid=os.getpid())
    runtime_env = {"worker_process_setup_hook": "fleet.common.supervision.die_with_parent"}
    if args.ray_address:
        ray.init(address=args.ray_address, include_dashboard=False, runtime_env=runtime_env)
    else:
        kill_group_when_gone()
        ray.init(
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=256 << 20,
            runtime_env=runtime_env,
        )
    # After ray.init: Ray installs its own SIGTERM handler, which would kill us without the
    # orderly stop below (final store totals, trainer state).
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop_with_supervisor()  # under `fleet up`: its death is a SIGTERM here
    tokens_file = args.tokens_file.resolve() if args.tokens_file else None
    limits = StreamLimits(
        per_cell=args.max_streams_per_cell,
        total=args.max_streams,
        idle_timeout_s=args.idle_timeout_s,
    )
    n_servers = max(1, args.ingest_servers)

    def new_gateway(index: int) -> Any:
        return ray.remote(num_cpus=0, max_concurrency=4)(GatewayActor).remote(
            store_root,
            redis_url,
            tasks,
            host=args.host,
            port=port,
            tokens_file=tokens_file,
            limits=limits,
            tls_dir=args.tls_dir.resolve() if args.tls_dir else None,
            require_client_cert=args.mtls,
            truncate_after_s=args.truncate_after_s if index == 0 else None,
            max_episode_steps=args.max_episode_steps,
            reuse_port=n_servers > 1,
            lease=Lease(lease_path),
        )

    # Several ingest servers bind one address; the first picks the port when --port is 0.
    port = args.port
    gateway = new_gateway(0)
    port = ray.get(gateway.start.remote())
    extra_gateways = [new_gateway(i) for i in range(1, n_servers)]
    ray.get([g.start.remote() for g in extra_gateways])
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
        signing_key=str(args.signing_key.resolve()) if args.signing_key else "",
        checkpoint_dir=str((args.checkpoint_dir or data_dir / "checkpoints").resolve()),
        checkpoint_every_updates=args.checkpoint_every,
        checkpoint_every_s=args.checkpoint_every_s,
        decode_workers=args.decode_workers,
        policy_overrides=policy_overrides,
        action_scale=args.action_scale,
        action_scale_wait_s=args.action_scale_wait_s,
        first_version_demos=args.first_version_demos,
        sampler=SamplerConfig(
            batch_size=args.batch_size,
            min_steps=args.min_steps,
            max_samples_per_insert=args.max_samples_per_insert,
            advantage_weighting=args.advantage_weighting,
            task_weights=task_weights,
            hold_after_success=args.hold_after_success,
        ).for_model(model_config),
    )
    trainer = ray.remote(num_cpus=1, max_concurrency=2)(TrainerActor).remote(
        trainer_cfg, store_root, versions_dir, redis_url, lease=Lease(lease_path)
    )
    ray.get(trainer.start.remote())
    metrics.register(
        metrics.RemoteCollector(
            {
                "gateway": lambda: ray.get(gateway.metrics_text.remote(), timeout=5.0),
                "trainer": lambda: ray.get(trainer.metrics_text.remote(), timeout=5.0),
            }
        )
    )
    metrics.register(metrics.RegistryCollector(registry))  # outcomes, cells, rollout
    metrics_server = metrics.serve_metrics(args.metrics_port, host=args.metrics_host)
    registry.set_learner_stats(state="ready", port=port)
    log.info(
        "learner ready: gateway on %s:%d, tasks %s, cameras %s, preset %s",
        args.host,
        port,
        ",".join(tasks),
        ",".join(cameras),
        args.preset,
    )
    controller = None
    if args.rollout == "auto":  # stages each published version (learner/rollout_controller.py)
        from fleet.control.rollout import RuleConfig
        from learner.rollout_controller import ControllerConfig, RolloutController

        gate = None
        if args.sim_gate > 0:
            from learner.sim_gate import SimGate

            gate = SimGate(args.sim_gate, redis_url=redis_url, backend=args.sim_gate_backend)
        controller = RolloutController(
            registry,
            ControllerConfig(
                canary=args.canary,
                fraction=args.rollout_fraction,
                rule=RuleConfig(min_episodes=args.rollout_min_episodes),
            ),
            sim_gate=gate,
        )
        controller.start()
    # The learning curves in Redis, sampled here too so they have no gaps while no
    # dashboard runs (fleet/control/dashboard/history.py; only one process writes each sample).
    from fleet.control.dashboard.history import LearningHistory

    history = LearningHistory(registry)
    history.start()
    stop.wait()

    log.info("learner stopping")
    history.stop()
    if controller is not None:
        controller.stop()
    if metrics_server is not None:
        metrics_server.stop()
    ray.get(trainer.stop.remote())
    totals = ray.get(gateway.totals.remote())
    stats = ray.get(trainer.stats.remote())
    registry.set_learner_stats(
        state="stopped", store_steps=totals["steps"], store_episodes=totals["episodes"], **stats
    )
    ray.get([g.stop.remote() for g in (gateway, *extra_gateways)])
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

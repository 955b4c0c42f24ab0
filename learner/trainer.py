"""The continuous training loop: sample, update through RLlib, publish every N updates.

It runs on its own thread inside a Ray actor so the actor can still answer stats() and
stop() while training. The thread is supervised: an unexpected error is logged, counted and
shown in the registry (`fleet status`), and the loop starts again after a backoff, so no
single failure ends training for good. An episode the sampler cannot decode is quarantined
by the sampler itself and never reaches this loop as an error.

Lineage invariant (why publish and checkpoint are ordered): a version is published only
after a checkpoint holding exactly its weights, its training step and its id (as the last
entry of `versions`, marked pending) is on disk. So every published step is at or below
the checkpoint's step, and a restarted trainer, which continues from the checkpoint, only
ever publishes steps above it: no step is published twice. A crash between that checkpoint
and the registration leaves the version pending; the restarted trainer finishes it (same
id, same step, same weights) before training on. A version's parent is the version before
it in that checkpointed lineage: the one its weights descend from.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fleet.common.policy.config import PolicyConfig, policy_config
from fleet.common.policy.model import UnifiedPolicy
from fleet.control.registry import Registry
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.decode_pool import DecodePool
from learner.learner_group import build_learner_group, get_state_dict, update
from learner.publisher import LearnerGone, Publisher
from learner.sampler import EpisodeSampler, SamplerConfig, decode_jpegs
from learner.store import EpisodeStore

log = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    """Everything that decides what is trained and how often it is published."""

    tasks: tuple[str, ...]
    cameras: tuple[str, ...]
    preset: str = "tiny"
    lr: float = 3e-4
    publish_every_updates: int = 200
    num_learners: int = 0
    num_gpus_per_learner: float = 0.0
    torch_threads: int = 1
    rollout_mode: str = "immediate"
    signing_key: str = ""  # Ed25519 private key PEM that signs each version ("" = unsigned)
    checkpoint_dir: str = ""  # "" = no checkpoints; else resume from and save to this dir
    checkpoint_every_updates: int = 500
    checkpoint_every_s: float = 300.0
    decode_workers: int = 0  # 0 = decode JPEGs in-process (see learner/decode_pool.py)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # Backoff before the training loop restarts after an unexpected error (doubles up to max).
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    # PolicyConfig fields set over the preset's (e.g. {"keypoints": 16}); chunk_len is the
    # sampler's.
    policy_overrides: dict[str, Any] = field(default_factory=dict)
    # "data": before the first update, PolicyConfig.action_scale is measured on the episodes
    # stored by then (the operators' first demonstrations) and kept for good (checkpointed,
    # in every manifest); "none": joint-limit units. An action_scale in policy_overrides wins.
    action_scale: str = "data"
    # "data": the first update waits up to this long, once the sampler is ready, for an
    # episode of every task, so that no task's joints are scaled without its data (a joint
    # only a missing task moves would get the floor and its errors weigh up to ~5x more).
    # 0 = measure at once on what is stored: a lab whose operators demonstrate tasks one
    # after another sets how long the first version may wait for the rest.
    action_scale_wait_s: float = 0.0
    # No version is published until the store holds this many demonstrations (episodes the
    # operator drove whole) of every task: cells run no policy before the first version, so
    # their operators keep demonstrating, and the trainer trains on the demonstrations
    # meanwhile. 0 = publish after the first publish_every_updates, whatever is stored.
    first_version_demos: int = 0


class Trainer:
    """Owns the LearnerGroup, the sampler and the publisher."""

    def __init__(
        self,
        config: TrainerConfig,
        store_root: Path,
        versions_dir: Path,
        registry_url: str,
        *,
        registry_prefix: str = "fleet:",
        alive: Callable[[], bool] | None = None,
    ) -> None:
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.registry = Registry(registry_url, prefix=registry_prefix)
        self.policy_config = policy_config(
            config.preset,
            config.tasks,
            config.cameras,
            **{**config.policy_overrides, "chunk_len": config.sampler.chunk_len},
        )
        self.decode_pool = DecodePool(config.decode_workers) if config.decode_workers else None
        self.sampler = EpisodeSampler(
            EpisodeStore(store_root),
            config.cameras,
            config.tasks,
            # Batches at the model's input size, whatever camera modes the cells run, and
            # only of steps within the model's joint range.
            config.sampler.for_model(self.policy_config),
            decoder=self.decode_pool or decode_jpegs,
        )
        self.publisher = Publisher(
            self.registry,
            versions_dir,
            rollout_mode=config.rollout_mode,
            signing_key=Path(config.signing_key) if config.signing_key else None,
            alive=alive,
        )
        self._alive = alive
        self.learner_group = build_learner_group(
            self.policy_config,
            lr=config.lr,
            num_learners=config.num_learners,
            num_gpus_per_learner=config.num_gpus_per_learner,
        )
        self.updates = 0
        self.last_loss = float("nan")
        self.versions: list[str] = []
        # The version named in the last checkpoint but maybe not registered yet (see above).
        self._pending: dict[str, Any] | None = None
        self.restarts = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._last_stats = 0.0
        self._scale_wait_since: float | None = None  # see _wait_for_every_task
        self._waiting_for = ""  # tasks short of first_version_demos (see _publish_due)
        self._short_tasks: list[str] = []
        self._last_checkpoint = time.monotonic()
        self._checkpoint_root = Path(config.checkpoint_dir) if config.checkpoint_dir else None
        self.resumed = self._resume()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.checkpoint()
        if self.decode_pool is not None:
            self.decode_pool.close()
        self.registry.set_learner_stats(**self.stats())

    def stats(self) -> dict[str, float | int | str]:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return {
            "updates": self.updates,
            "loss": self.last_loss,
            "versions": len(self.versions),
            "latest_version": self.versions[-1] if self.versions else "",
            "updates_per_s": self.updates / elapsed,
            "replay_ratio": self.sampler.limiter.ratio(),
            "steps_available": self.sampler.steps_available,
            "episodes_available": self.sampler.episodes_available,
            "quarantined_episodes": self.sampler.quarantined,
            "last_quarantined": self.sampler.last_quarantined,
            "episodes_without_cameras": self.sampler.without_cameras,
            "last_without_cameras": self.sampler.last_without_cameras,
            "steps_out_of_range": self.sampler.out_of_range_steps,
            "last_out_of_range": self.sampler.last_out_of_range,
            "trainer_restarts": self.restarts,
            "trainer_error": self.last_error,
        }

    def _run(self) -> None:
        """Supervise the loop: restart it after an unexpected error, with backoff."""
        backoff = self.config.restart_backoff_s
        while not self._stop.is_set():
            try:
                self._loop()
                return
            except LearnerGone as exc:
                log.error("trainer stops at update %d: %s", self.updates, exc)
                return
            except Exception as exc:
                self.restarts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.exception(
                    "trainer loop failed at update %d (restart %d in %.1f s)",
                    self.updates,
                    self.restarts,
                    backoff,
                )
                self._safe_stats(trainer_state="restarting")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.restart_backoff_max_s)

    def _loop(self) -> None:
        if self._pending is not None:
            self._finish_publish()
        while not self._stop.is_set():
            if not self.sampler.ready():
                self._publish_stats()
                self._stop.wait(0.2)
                continue
            if self.updates == 0 and self.config.action_scale == "data":
                if self._wait_for_every_task():
                    self._stop.wait(0.2)
                    continue
                self._measure_action_scale()
            batch = self.sampler.sample()
            metrics = update(self.learner_group, batch)
            self.updates += 1
            self.last_loss = float(metrics.get("loss", float("nan")))
            if self._publish_due():
                self.publish()
            else:
                self._maybe_checkpoint()
            self._publish_stats()

    def _publish_due(self) -> bool:
        """Every publish_every_updates; the first version also waits for the operators'
        demonstrations (first_version_demos of every task) and follows them at once."""
        every = self.config.publish_every_updates
        if self.versions:
            return self.updates % every == 0
        if self.updates < every:
            return False
        want = self.config.first_version_demos
        short = {t: n for t, n in self.sampler.demonstrations_by_task().items() if n < want}
        waiting = ", ".join(f"{t} {n}/{want}" for t, n in sorted(short.items()))
        if short and sorted(short) != self._short_tasks:  # logged as tasks reach it
            log.info("first version waits for demonstrations: %s", waiting)
        elif not short and want:
            log.info("%d demonstrations of every task stored: first version", want)
        self._short_tasks = sorted(short)
        self._waiting_for = waiting  # the counts, shown in trainer_state
        return not short

    def publish(self) -> str:
        """Checkpoint this version's weights under its id first, then publish it."""
        version_id = self.publisher.next_version_id(self.versions)
        self._pending = {
            "version": version_id,
            "parent": self.versions[-1] if self.versions else None,
            "step": self.updates,
            "data_seen": self.sampler.steps_available,
        }
        self.versions.append(version_id)
        try:
            self.checkpoint()
        except BaseException:  # not on disk: this version must not be published
            self.versions.pop()
            self._pending = None
            raise
        self._finish_publish()
        return version_id

    def _finish_publish(self) -> None:
        """Register the pending version (idempotent: done already if the registry has it)."""
        pending = self._pending
        assert pending is not None
        version_id = str(pending["version"])
        if self.registry.version(version_id) is None:
            model = UnifiedPolicy(self.policy_config)
            model.load_state_dict(get_state_dict(self.learner_group))
            parent = pending["parent"]
            self.publisher.publish(
                model,
                training_step=int(pending["step"]),
                data_seen=int(pending["data_seen"]),
                lineage=[str(parent)] if parent else [],
                version_id=version_id,
            )
        self._pending = None

    def _wait_for_every_task(self) -> bool:
        """True while the action scale should wait for a first episode of some task (up to
        action_scale_wait_s from the first time the sampler was ready)."""
        missing = self.sampler.tasks_without_episodes()
        if self.policy_config.action_scale or not missing:
            return False
        now = time.monotonic()
        if self._scale_wait_since is None:
            self._scale_wait_since = now
            if self.config.action_scale_wait_s > 0:
                log.info(
                    "first update waits up to %.0f s for an episode of %s to measure the "
                    "action scale",
                    self.config.action_scale_wait_s,
                    ", ".join(missing),
                )
        if now - self._scale_wait_since < self.config.action_scale_wait_s:
            if now - self._last_stats >= 1.0:
                self._last_stats = now
                self._safe_stats(trainer_state="waiting for tasks: " + ",".join(missing))
            return True
        log.warning(
            "no episode of %s after %.0f s: the action scale is measured without them",
            ", ".join(missing),
            self.config.action_scale_wait_s,
        )
        return False

    def _measure_action_scale(self) -> None:
        """Fix the model's action_scale from the data before its first update (a model that
        has not been updated yet is rebuilt, so nothing learnt is lost)."""
        if self.policy_config.action_scale:
            return
        scale = self.sampler.action_scale(
            self.policy_config.joint_lower, self.policy_config.joint_upper
        )
        self._rebuild(dataclasses.replace(self.policy_config, action_scale=scale))
        log.info(
            "action scale measured on %d stored steps: %s",
            self.sampler.steps_available,
            " ".join(f"{x:.3f}" for x in scale),
        )

    def _rebuild(self, policy_cfg: PolicyConfig) -> None:
        """A new LearnerGroup for `policy_cfg` in place of the current one."""
        old = self.learner_group
        self.policy_config = policy_cfg
        self.learner_group = build_learner_group(
            policy_cfg,
            lr=self.config.lr,
            num_learners=self.config.num_learners,
            num_gpus_per_learner=self.config.num_gpus_per_learner,
        )
        old.shutdown()

    def _maybe_checkpoint(self) -> None:
        cfg = self.config
        due_updates = cfg.checkpoint_every_updates > 0 and (
            self.updates % cfg.checkpoint_every_updates == 0
        )
        due_time = time.monotonic() - self._last_checkpoint >= cfg.checkpoint_every_s
        if due_updates or due_time:
            self.checkpoint()

    def checkpoint(self) -> Path | None:
        """Save weights, optimizer, counters, sampler position and lineage (atomically)."""
        if self._checkpoint_root is None:
            return None
        if self._alive is not None and not self._alive():
            # An orphan's checkpoint could name a version the next learner would publish.
            raise LearnerGone("no checkpoint: the learner process is gone")
        group_state = self.learner_group.get_state()
        learner_state = group_state["learner"]
        state = {
            "format": 1,
            "learner": {k: learner_state[k] for k in ("rl_module", "optimizer")},
            "trainer": {
                "updates": self.updates,
                "last_loss": self.last_loss,
                "versions": list(self.versions),
                "pending_version": self._pending,
                "action_scale": list(self.policy_config.action_scale),
                "saved_at": time.time(),
            },
            "sampler": self.sampler.position(),
        }
        path = save_checkpoint(self._checkpoint_root, state)
        self._last_checkpoint = time.monotonic()
        log.info(
            "checkpoint at update %d (latest version %s) -> %s",
            self.updates,
            self.versions[-1] if self.versions else "none",
            path,
        )
        return path

    def _resume(self) -> bool:
        if self._checkpoint_root is None:
            return False
        state = load_checkpoint(self._checkpoint_root)
        if state is None:
            log.info("no checkpoint in %s: starting fresh", self._checkpoint_root)
            return False
        trainer = state["trainer"]
        scale = tuple(float(x) for x in trainer.get("action_scale", ()))
        if scale != self.policy_config.action_scale:  # the network the checkpoint trained
            self._rebuild(dataclasses.replace(self.policy_config, action_scale=scale))
        self.learner_group.set_state({"learner": state["learner"]})
        self.updates = int(trainer["updates"])
        self.last_loss = float(trainer["last_loss"])
        self.versions = [str(v) for v in trainer["versions"]]
        self._pending = trainer.get("pending_version")
        self.sampler.restore_position(state["sampler"])
        log.info(
            "resumed from %s at update %d, latest version %s",
            self._checkpoint_root,
            self.updates,
            self.versions[-1] if self.versions else "none",
        )
        return True

    def _publish_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats < 1.0:
            return
        self._last_stats = now
        state = "training"
        if self._waiting_for:
            state += "; first version waits for demonstrations: " + self._waiting_for
        self.registry.set_learner_stats(trainer_state=state, **self.stats())

    def _safe_stats(self, **extra: float | int | str) -> None:
        """Stats to the registry from the error path: a Redis outage must not end the
        supervisor too."""
        try:
            self.registry.set_learner_stats(**extra, **self.stats())
        except Exception as exc:  # the registry is what failed, perhaps
            log.warning("trainer stats not recorded in the registry: %s", exc)

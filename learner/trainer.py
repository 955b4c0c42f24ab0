"""The continuous training loop: sample, update through RLlib, publish every N updates.

It runs on its own thread inside a Ray actor so the actor can still answer stats() and
stop() while training.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fleet.policy.config import policy_config
from fleet.policy.model import UnifiedPolicy
from fleet.registry import Registry
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.decode_pool import DecodePool
from learner.learner_group import build_learner_group, get_state_dict, update
from learner.publisher import Publisher
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
    # PolicyConfig fields set over the preset's (e.g. {"keypoints": 16}); chunk_len is the
    # sampler's.
    policy_overrides: dict[str, Any] = field(default_factory=dict)


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
            config.sampler,
            decoder=self.decode_pool or decode_jpegs,
        )
        self.publisher = Publisher(
            self.registry,
            versions_dir,
            rollout_mode=config.rollout_mode,
            signing_key=Path(config.signing_key) if config.signing_key else None,
        )
        self.learner_group = build_learner_group(
            self.policy_config,
            lr=config.lr,
            num_learners=config.num_learners,
            num_gpus_per_learner=config.num_gpus_per_learner,
        )
        self.updates = 0
        self.last_loss = float("nan")
        self.versions: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._last_stats = 0.0
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
        }

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.sampler.ready():
                    self._publish_stats()
                    self._stop.wait(0.2)
                    continue
                batch = self.sampler.sample()
                metrics = update(self.learner_group, batch)
                self.updates += 1
                self.last_loss = float(metrics.get("loss", float("nan")))
                if self.updates % self.config.publish_every_updates == 0:
                    self.publish()
                self._maybe_checkpoint()
                self._publish_stats()
        except Exception:
            log.exception("trainer loop failed after %d updates", self.updates)
            self.registry.set_learner_stats(state="failed")
            raise

    def publish(self) -> str:
        model = UnifiedPolicy(self.policy_config)
        model.load_state_dict(get_state_dict(self.learner_group))
        manifest = self.publisher.publish(
            model,
            training_step=self.updates,
            data_seen=self.sampler.steps_available,
            lineage=self.versions,
        )
        self.versions.append(manifest.version_id)
        return manifest.version_id

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
        group_state = self.learner_group.get_state()
        learner_state = group_state["learner"]
        state = {
            "format": 1,
            "learner": {k: learner_state[k] for k in ("rl_module", "optimizer")},
            "trainer": {
                "updates": self.updates,
                "last_loss": self.last_loss,
                "versions": list(self.versions),
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
        self.learner_group.set_state({"learner": state["learner"]})
        trainer = state["trainer"]
        self.updates = int(trainer["updates"])
        self.last_loss = float(trainer["last_loss"])
        self.versions = [str(v) for v in trainer["versions"]]
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
        self.registry.set_learner_stats(**self.stats())

"""`fleet learner`'s flags as one typed model (fleet/common/config_cli.py generates the parser).

Defaults that are also the trainer's, the sampler's or the gateway's come from their config
classes, so the command line and a learner built in code start from the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from fleet.common.config_cli import flag
from fleet.common.metrics import MetricsOptions
from fleet.common.scenes import SimBackend
from fleet.control.connection import REDIS_URL_ENV
from learner.admission import StreamLimits
from learner.chunks import MAX_EPISODE_STEPS
from learner.sampler import SamplerConfig
from learner.trainer import TrainerConfig


class LearnerOptions(MetricsOptions):
    """Everything `fleet learner` is told on its command line."""

    redis_url: str | None = Field(
        None, description=f"Redis holding the fleet registry (default: ${REDIS_URL_ENV})"
    )
    data_dir: Path = Field(
        description="where the episode store (store/) and versions (versions/) live"
    )
    host: str = Field("127.0.0.1", description="address the gateway binds")
    port: int = Field(50051, description="gateway port (0 = any free port)")
    tasks: str = Field(description="comma-separated task names the model learns")
    cameras: str = Field(description="comma-separated camera names, model order")
    preset: str = Field(TrainerConfig.preset, description="model preset: tiny, small, base, large")
    batch_size: int = SamplerConfig.batch_size
    lr: float = TrainerConfig.lr
    publish_every: int = Field(
        TrainerConfig.publish_every_updates, description="publish a new version every N updates"
    )
    min_steps: int = Field(
        SamplerConfig.min_steps, description="stored steps before training starts"
    )
    max_samples_per_insert: float = Field(
        SamplerConfig.max_samples_per_insert,
        description="rate limit: sampled steps per stored step before the trainer waits",
    )
    num_learners: int = Field(
        TrainerConfig.num_learners, description="remote RLlib learners (0=local)"
    )
    num_gpus_per_learner: float = TrainerConfig.num_gpus_per_learner
    torch_threads: int = TrainerConfig.torch_threads
    rollout: Literal["immediate", "auto", "manual"] = Field(
        "immediate",
        description="immediate: every cell takes each new version; auto: staged canary "
        "rollout; manual: versions are registered and nothing moves until an operator acts",
    )
    canary: int = Field(1, description="auto rollout: canary cells")
    rollout_fraction: float = Field(0.5, description="auto rollout: share of the fleet")
    rollout_min_episodes: int = Field(
        30, description="auto rollout: candidate episodes per stage before it may advance"
    )
    sim_gate: int = flag(
        0,
        "auto rollout: a new version goes to canary only after `fleet eval` on N held-out "
        "scenes a task shows it not credibly worse than stable (0 = off)",
        metavar="N",
    )
    sim_gate_backend: SimBackend = Field(
        "mujoco", description="sim backend of the sim gate's evaluation"
    )
    ray_address: str | None = Field(None, description="join this Ray cluster (default: local)")
    tls_dir: Path | None = Field(
        None,
        description="serve TLS with learner.pem/learner.key and ca.pem from here (required "
        "unless --insecure)",
    )
    mtls: bool = Field(False, description="with --tls-dir: require a cell client certificate")
    tokens_file: Path | None = Field(
        None,
        description='JSON {"cell_id": "token"}: the allow-list of cells, re-read when it '
        "changes (remove a cell to revoke it); required unless --insecure",
    )
    insecure: bool = Field(
        False,
        description="serve plaintext gRPC and accept any cell without a token (local tests only)",
    )
    max_streams_per_cell: int = Field(
        StreamLimits.per_cell, description="open streams one cell may hold"
    )
    max_streams: int = Field(StreamLimits.total, description="open streams in all")
    idle_timeout_s: float = Field(
        StreamLimits.idle_timeout_s,
        description="close an upload stream that sends nothing for this long",
    )
    max_episode_steps: int = Field(
        MAX_EPISODE_STEPS,
        description="steps one episode may hold; later ones are refused with the reason (a "
        "cell whose episode never ends must not fill the store with one never trained on)",
    )
    truncate_after_s: float = Field(
        60.0,
        description="mark an unfinished episode truncated after this long without a chunk "
        "(0 = never)",
    )
    ingest_servers: int = Field(
        1,
        description="gateway actors sharing the one address (SO_REUSEPORT spreads connections)",
    )
    signing_key: Path | None = Field(
        None,
        description="Ed25519 private key (PEM, ops/make_signing_key.py) that signs every version",
    )
    checkpoint_dir: Path | None = Field(
        None,
        description="trainer checkpoints; resumed from on start (default <data-dir>/checkpoints)",
    )
    checkpoint_every: int = Field(
        TrainerConfig.checkpoint_every_updates, description="checkpoint every N updates"
    )
    checkpoint_every_s: float = Field(
        TrainerConfig.checkpoint_every_s, description="and at least every T seconds"
    )
    decode_workers: int = Field(
        TrainerConfig.decode_workers, description="Ray actors decoding JPEGs (0=in-process)"
    )
    policy_set: list[str] = flag(
        default_factory=list,
        help="model settings over the preset's, e.g. keypoints=16 shift_augment=4 chunk_len=20",
        metavar="KEY=VALUE",
    )
    action_scale: Literal["data", "none"] = Field(
        TrainerConfig.action_scale,
        description="data: measure the model's per-joint action scale on the episodes stored"
        " before its first update; none: joint-limit units",
    )
    action_scale_wait_s: float = Field(
        TrainerConfig.action_scale_wait_s,
        ge=0.0,
        description="with --action-scale data: the first update waits up to this many seconds "
        "for an episode of every task (0 = measure at once on what is stored; fleet up: 120)",
    )
    first_version_demos: int = flag(
        TrainerConfig.first_version_demos,
        "publish no version until the store holds N demonstrations (episodes an operator "
        "drove whole) of every task; cells demonstrate until a version arrives",
        metavar="N",
        ge=0,
    )
    task_weight: list[str] = flag(
        default_factory=list,
        help="a task's share of each batch against the others' 1.0, e.g. place_cube=2"
        " (0 leaves a task out of training; its episodes stay stored)",
        metavar="TASK=WEIGHT",
    )
    hold_after_success: bool = Field(
        False,
        description="train chunk targets past the end of a successful episode as holding "
        "its last action instead of masking them (stop at the goal; fleet up turns it on for"
        " MuJoCo cells: README 'How well it learns')",
    )
    advantage_weighting: bool = Field(
        False,
        description="weight episodes by exp(advantage/beta) from their outcome (AWR-style)",
    )

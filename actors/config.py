"""One cell's edge actor settings, fixed for the actor's lifetime."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ActorConfig:
    """What a cell's actor needs to know; checked once here so the loop never has to."""

    cell_id: str
    learner_address: str  # "host:port" of the learner gateway
    control_hz: float = 20.0
    chunk_steps: int = 20  # steps per uploaded StepChunk
    max_episode_s: float = 8.0  # clock seconds before an episode ends as "timeout"
    jpeg_quality: int = 90
    tasks: tuple[str, ...] = ()  # round robin over these; empty = the scene's tasks
    rpc_deadline_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    # In-memory chunks: without a spool the most kept unacked; with one, the most waiting
    # for the disk, and the most held in memory (the rest are read back from the spool).
    uplink_queue_chunks: int = 256
    # Every chunk is on disk here before it is sent and until it is acked (actors/spool.py);
    # "" keeps chunks in memory only (tests), so an actor restart would lose the unacked.
    spool_dir: str = ""
    spool_quota_bytes: int = 2 << 30  # when full, new episodes' tails are refused, counted
    seed: int = 0  # episode seeds (scene layouts) derive from it
    verify_key: str = ""  # learner's Ed25519 public key PEM; "" = signatures not checked
    version_cache_dir: str = ""  # on-disk cache of verified versions; "" = no cache
    version_cache_max_bytes: int = 2 << 30
    # Versions the cell may soon run are fetched ahead at most this fast (0 = not at all).
    prefetch_bytes_per_s: float = 25e6

    def __post_init__(self) -> None:
        if not self.cell_id:
            raise ValueError("cell_id is required")
        host, sep, port = self.learner_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"learner_address must be host:port, got {self.learner_address!r}")
        for name in ("control_hz", "max_episode_s", "rpc_deadline_s", "heartbeat_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if self.chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1, got {self.chunk_steps}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.uplink_queue_chunks < 1:
            raise ValueError(f"uplink_queue_chunks must be >= 1, got {self.uplink_queue_chunks}")
        rate = self.prefetch_bytes_per_s
        if not (rate == 0 or (math.isfinite(rate) and rate >= 64 << 10)):
            raise ValueError(f"prefetch_bytes_per_s must be 0 (off) or >= 65536, got {rate!r}")
        if self.spool_quota_bytes < 1:
            raise ValueError(f"spool_quota_bytes must be >= 1, got {self.spool_quota_bytes}")
        object.__setattr__(self, "spool_dir", str(self.spool_dir))
        object.__setattr__(self, "tasks", tuple(self.tasks))

    @property
    def period_s(self) -> float:
        return 1.0 / self.control_hz

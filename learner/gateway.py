"""The learner's gRPC endpoint: trajectory ingest and policy distribution on one port.

Cells see one address. Ingest writes each received chunk to the zarr store and acks it once
durable; the policy service answers version watches, weight fetches and heartbeats. Both
share one Admission (learner/admission.py): one allow-list of cells, and one count of each
cell's open streams against the caps, which also size the server's thread pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from concurrent import futures
from pathlib import Path

import grpc

from fleet.common.heap import keep_freed_memory
from fleet.common.tls import server_credentials
from fleet.control.registry import Registry
from learner import ingest, policy_service
from learner.admission import Admission, StreamLimits
from learner.auth import TokensFile
from learner.chunks import MAX_EPISODE_STEPS, DecodedChunk
from learner.ingest import IngestServicer
from learner.policy_service import PolicyServicer
from learner.shadow_scoring import shadow_score
from learner.store import EpisodeStore, EpisodeSummary
from learner.truncation import TruncationSweeper

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20


class Gateway:
    """Owns the gRPC server, the episode store writer and their Redis bookkeeping."""

    def __init__(
        self,
        store_root: Path,
        registry_url: str,
        tasks: Collection[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Mapping[str, str] | None = None,
        tokens_file: Path | None = None,
        limits: StreamLimits | None = None,
        tls_dir: Path | None = None,
        require_client_cert: bool = False,
        truncate_after_s: float | None = None,
        max_episode_steps: int = MAX_EPISODE_STEPS,
        reuse_port: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        # Ingest frees megabytes a chunk; refaulting them each time costs more than the
        # store's own work (fleet/common/heap.py).
        keep_freed_memory()
        self.store = EpisodeStore(store_root)
        self.registry = Registry(registry_url)
        self.host = host
        self.port = port
        # TLS when tls_dir is given (learner.pem/.key, ca.pem); mutual TLS on request.
        self.tls_dir = tls_dir
        self.require_client_cert = require_client_cert
        # Only one of several ingest servers sweeps (None = no sweeper here).
        self.sweeper = (
            TruncationSweeper(self.store, truncate_after_s=truncate_after_s)
            if truncate_after_s
            else None
        )
        extra_options: list[tuple[str, int]] = []
        if reuse_port:
            # Several ingest servers share one address; the kernel spreads connections.
            extra_options.append(("grpc.so_reuseport", 1))
        # The tokens file is the allow-list, re-read when it changes (revocation).
        allowed = TokensFile(tokens_file) if tokens_file is not None else tokens
        self.limits = limits or StreamLimits()
        self.admission = Admission(allowed, self.limits)
        self.ingest = IngestServicer(
            self.store,
            known_tasks=tasks,
            max_episode_steps=max_episode_steps,
            admission=self.admission,
            on_chunk=self._on_chunk,
            on_episode_end=self._on_episode_end,
            alive=alive,
        )
        self.policy = PolicyServicer(self.registry, admission=self.admission)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self.limits.workers, thread_name_prefix="gateway"
            ),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                *self.limits.server_options(),
                *extra_options,
            ],
            # Calls beyond this wait for no worker: refused at once (RESOURCE_EXHAUSTED).
            maximum_concurrent_rpcs=self.limits.workers * 4,
        )
        ingest.add_to_server(self.server, self.ingest)
        policy_service.add_to_server(self.server, self.policy)

    def start(self) -> int:
        """Bind and serve; returns the bound port."""
        address = f"{self.host}:{self.port}"
        if self.tls_dir is not None:
            creds = server_credentials(self.tls_dir, require_client_cert=self.require_client_cert)
            bound = self.server.add_secure_port(address, creds)
        else:
            bound = self.server.add_insecure_port(address)
        if bound == 0:
            raise RuntimeError(f"learner gateway could not bind {self.host}:{self.port}")
        self.port = bound
        self.server.start()
        if self.sweeper is not None:
            self.sweeper.start()
        log.info(
            "learner gateway serving on %s:%d (%s)",
            self.host,
            bound,
            "plaintext"
            if self.tls_dir is None
            else ("mutual TLS" if self.require_client_cert else "TLS"),
        )
        return bound

    def totals(self) -> dict[str, int]:
        """What the store holds now, read from the store itself."""
        steps, episodes = self.store.totals()
        return {"steps": steps, "episodes": episodes}

    def stats(self) -> dict[str, int]:
        return {
            **self.ingest.stats,
            "open_streams": self.admission.total_open(),
            "calls_refused": sum(self.admission.refused.values()),
        }

    def stop(self, grace_s: float = 5.0) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
        self.policy.stop()
        self.server.stop(grace_s).wait(grace_s + 1)
        log.info("learner gateway on port %d stopped", self.port)

    def _on_chunk(self, chunk: DecodedChunk) -> None:
        self.registry.add_store_totals(chunk.n_steps, 1 if chunk.seq == 0 else 0)
        score = shadow_score(chunk)  # a candidate in shadow: its distance to what was done
        if score is not None:
            self.registry.record_shadow(
                version=score.version,
                steps=score.steps,
                dist_stable_sum=score.dist_stable_sum,
                operator_steps=score.operator_steps,
                dist_operator_sum=score.dist_operator_sum,
            )

    def _on_episode_end(self, chunk: DecodedChunk, summary: EpisodeSummary) -> None:
        outcome = chunk.outcome or {}
        steps, interventions = summary.steps, summary.intervention_steps
        self.registry.record_episode(
            cell_id=chunk.cell_id,
            version=chunk.policy_version or "none",
            task=chunk.task,
            success=bool(outcome.get("success", False)),
            steps=steps,
            intervention_steps=interventions,
            takeovers=summary.takeovers,
            duration_s=_duration_s(outcome),
        )
        log.info(
            "cell %s episode %s (%s, version %s) complete: %d steps, %d takeovers, success=%s",
            chunk.cell_id,
            chunk.episode_id,
            chunk.task,
            chunk.policy_version or "none",
            steps,
            summary.takeovers,
            outcome.get("success"),
        )


def _duration_s(outcome: dict) -> float:
    """An episode's wall time from its outcome (0 when the cell did not say)."""
    try:
        return max(0.0, float(outcome["ended_at"]) - float(outcome["started_at"]))
    except (KeyError, TypeError, ValueError):
        return 0.0

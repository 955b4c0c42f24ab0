"""Turns the trainer's current weights into a published, registered policy version."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from fleet.policy.manifest import Manifest
from fleet.policy.model import UnifiedPolicy
from fleet.policy.weights import save_version
from fleet.registry import Registry
from fleet.signing import load_private_key, sign_digest

log = logging.getLogger(__name__)


class Publisher:
    """Writes safetensors + manifest, records the version in Redis and applies the rollout mode.

    In "immediate" mode every cell runs each new version as soon as it is published.
    """

    def __init__(
        self,
        registry: Registry,
        versions_dir: Path,
        *,
        rollout_mode: str = "immediate",
        signing_key: Path | None = None,
    ):
        self.registry = registry
        # Ed25519 key that signs each version (fleet/signing.py); None publishes unsigned.
        self._signing_key = load_private_key(signing_key) if signing_key else None
        self.versions_dir = Path(versions_dir)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.rollout_mode = rollout_mode

    def next_version_id(self, lineage: Sequence[str] = ()) -> str:
        """One past the highest of the registry's and the trainer's own (checkpointed)
        versions, so a learner resumed against a fresh Redis never reuses an id."""
        known = [v["version_id"] for v in self.registry.versions()] + list(lineage)
        numbers = [int(v[1:]) for v in known if v[:1] == "v" and v[1:].isdigit()]
        return f"v{max(numbers, default=0) + 1:04d}"

    def publish(
        self,
        model: UnifiedPolicy,
        *,
        training_step: int,
        data_seen: int,
        lineage: Sequence[str] = (),
    ) -> Manifest:
        version_id = self.next_version_id(lineage)
        manifest = Manifest(
            version_id=version_id,
            parent=self.registry.latest_version() or (lineage[-1] if lineage else None),
            model_config=model.config.to_dict(),
            training_step=training_step,
            data_seen=data_seen,
            sha256="",
            created_at=time.time(),
            parameter_count=0,
        )
        signer = None
        if self._signing_key is not None:
            key = self._signing_key

            def signer(version: str, digest: str) -> str:
                return sign_digest(key, version, digest)

        weights_path, manifest_path = save_version(
            self.versions_dir, model, manifest, signer=signer
        )
        manifest = Manifest.from_json(manifest_path.read_text())
        self.registry.add_version(manifest.to_json(), str(weights_path), published_at=time.time())
        if self.rollout_mode == "immediate":
            self.registry.set_stable(
                version_id, actor="publisher", reason="immediate rollout: newest version"
            )
        log.info(
            "published version %s (parent %s) at step %d after %d steps of data, sha256 %s",
            version_id,
            manifest.parent,
            training_step,
            data_seen,
            manifest.sha256[:12],
        )
        return manifest

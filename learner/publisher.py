"""Turns the trainer's current weights into a published, registered policy version."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fleet.common.policy.manifest import Manifest
from fleet.common.policy.model import UnifiedPolicy
from fleet.common.policy.weights import save_version
from fleet.common.signing import load_private_key, sign_digest
from fleet.control.registry import Registry

log = logging.getLogger(__name__)


class Publisher:
    """Writes safetensors + manifest, records the version in Redis and applies the rollout mode.

    In "immediate" mode every cell runs each new version as soon as it is published.
    `alive` (see fleet/control/lease.py) is asked before the weights are written and again before
    the version is registered: once the learner process that owns this publisher is gone,
    nothing more is published in its name.
    """

    def __init__(
        self,
        registry: Registry,
        versions_dir: Path,
        *,
        rollout_mode: str = "immediate",
        signing_key: Path | None = None,
        alive: Callable[[], bool] | None = None,
    ):
        self.registry = registry
        self._alive = alive
        # Ed25519 key that signs each version (fleet/common/signing.py); None publishes unsigned.
        self._signing_key = load_private_key(signing_key) if signing_key else None
        self.versions_dir = Path(versions_dir)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.rollout_mode = rollout_mode

    def next_version_id(self, lineage: Sequence[str] = ()) -> str:
        """One past the highest of the registry's and the trainer's own (checkpointed)
        versions, so a learner resumed against a fresh Redis never reuses an id."""
        known = [v.version_id for v in self.registry.versions()] + list(lineage)
        numbers = [int(v[1:]) for v in known if v[:1] == "v" and v[1:].isdigit()]
        return f"v{max(numbers, default=0) + 1:04d}"

    def publish(
        self,
        model: UnifiedPolicy,
        *,
        training_step: int,
        data_seen: int,
        lineage: Sequence[str] = (),
        version_id: str | None = None,
    ) -> Manifest:
        """Write, sign and register `model` as a new version.

        Its parent is the last version of `lineage`, the versions the model's weights
        descend from (None: trained from scratch), never whatever the registry holds
        newest. `version_id` is the id the trainer already recorded in its checkpoint;
        by default the next free one.
        """
        version_id = version_id or self.next_version_id(lineage)
        self._check_alive(version_id)
        manifest = Manifest(
            version_id=version_id,
            parent=lineage[-1] if lineage else None,
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
        self._check_alive(version_id)
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

    def _check_alive(self, version_id: str) -> None:
        if self._alive is not None and not self._alive():
            raise LearnerGone(f"version {version_id} not published: the learner process is gone")


class LearnerGone(RuntimeError):
    """The learner this worker belongs to has died; nothing may leave in its name."""

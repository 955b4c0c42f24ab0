"""A policy version's manifest: what the weights are, where they came from, how they did.

It travels next to the safetensors file (and through the registry), so it is plain JSON with
no code in it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

_REQUIRED = ("version_id", "model_config", "training_step", "data_seen", "sha256")


@dataclass
class Manifest:
    """Identity, lineage, architecture and integrity of one published policy version."""

    version_id: str
    parent: str | None
    model_config: dict[str, Any]
    training_step: int
    data_seen: int  # environment steps available to training when this version was cut
    sha256: str
    signature: str = ""
    created_at: float = field(default_factory=time.time)
    parameter_count: int = 0
    evaluation: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, s: str | bytes) -> Manifest:
        """Parse and type-check; unknown keys from newer writers are ignored."""
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ValueError("manifest must be a JSON object")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"manifest lacks {missing}")
        if not isinstance(d["version_id"], str) or not d["version_id"]:
            raise ValueError("manifest version_id must be a non-empty string")
        parent = d.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise ValueError("manifest parent must be a string or null")
        if not isinstance(d["model_config"], dict):
            raise ValueError("manifest model_config must be an object")
        evaluation = d.get("evaluation", {})
        if not isinstance(evaluation, dict):
            raise ValueError("manifest evaluation must be an object")
        try:
            return cls(
                version_id=d["version_id"],
                parent=parent,
                model_config=d["model_config"],
                training_step=int(d["training_step"]),
                data_seen=int(d["data_seen"]),
                sha256=str(d["sha256"]),
                signature=str(d.get("signature", "")),
                created_at=float(d.get("created_at", 0.0)),
                parameter_count=int(d.get("parameter_count", 0)),
                evaluation=evaluation,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"manifest {d.get('version_id')!r}: bad field: {exc}") from None

"""The registry's typed records read back what Redis holds and serve the dashboard's JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fleet.common.registry_records import Event, OutcomeCounts, RolloutState, VersionRecord


def test_version_record_serves_the_manifest_fields_with_where_and_when() -> None:
    manifest = {"version_id": "v0002", "parent": "v0001", "training_step": 40, "sha256": "ab"}
    raw = {
        "manifest": json.dumps(manifest),
        "weights_path": "/w/v0002.safetensors",
        "published_at": "12.5",
    }
    record = VersionRecord.from_redis(raw)
    assert (record.version_id, record.parent, record.training_step) == ("v0002", "v0001", 40)
    assert record.evaluation is None
    assert record.to_json() == {
        **manifest,
        "weights_path": "/w/v0002.safetensors",
        "published_at": 12.5,
    }
    # The registry's evaluation wins over the one the manifest was published with.
    with_eval = VersionRecord.from_redis(
        {
            **raw,
            "manifest": json.dumps({**manifest, "evaluation": {"backend": "old"}}),
            "evaluation": json.dumps({"backend": "new"}),
        }
    )
    assert with_eval.evaluation == {"backend": "new"}
    assert with_eval.to_json()["evaluation"] == {"backend": "new"}
    from_manifest = VersionRecord.from_redis(
        {**raw, "manifest": json.dumps({**manifest, "evaluation": {"backend": "old"}})}
    )
    assert from_manifest.evaluation == {"backend": "old"}


def test_rollout_state_reads_unset_fields_as_none_and_empty() -> None:
    assert RolloutState.from_redis({}) == RolloutState()
    state = RolloutState.from_redis(
        {
            "mode": "auto",
            "stable": "v1",
            "candidate": "v2",
            "stage": "canary",
            "candidate_cells": '["c1", "c2"]',
            "stage_started_at": "100.5",
            "stage_episodes": "7",
        }
    )
    assert state.to_json() == {
        "mode": "auto",
        "stable": "v1",
        "candidate": "v2",
        "stage": "canary",
        "candidate_cells": ["c1", "c2"],
        "canary_cells": [],
        "stage_started_at": 100.5,
        "stage_episodes": 7,
    }


def test_event_keeps_its_kind_fields_apart_and_serves_them_flat() -> None:
    entry = {"kind": "rollback", "actor": "ctl", "reason": "worse", "ts": "9.5", "version": "v2"}
    event = Event.from_redis("1-0", entry)
    assert (event.kind, event.actor, event.reason, event.ts) == ("rollback", "ctl", "worse", 9.5)
    assert event.fields == {"version": "v2"}
    served = event.to_json()
    assert served == {"id": "1-0", **entry, "ts": 9.5}
    assert list(served) == ["id", "kind", "actor", "reason", "ts", "version"]


def test_a_misspelt_record_field_fails_loudly() -> None:
    with pytest.raises(AttributeError):
        OutcomeCounts().autonomous_sucesses  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(dataclasses.FrozenInstanceError):
        RolloutState().stable = "v1"  # type: ignore[misc]

"""Ed25519 policy signatures: keys, sign/verify, and the learner publishing signed versions."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fleet.common import signing
from fleet.common.policy.config import policy_config
from fleet.common.policy.manifest import Manifest
from fleet.common.policy.model import UnifiedPolicy
from fleet.common.signing import SignatureError, sign_digest, verify
from learner.publisher import Publisher

ROOT = Path(__file__).resolve().parent.parent
SHA = "ab" * 32


def test_signature_verifies_and_binds_version_and_digest() -> None:
    key = signing.generate_key()
    sig = sign_digest(key, "v0001", SHA)
    assert len(sig) == 88  # base64 of 64 bytes
    verify(key.public_key(), "v0001", SHA, sig)
    verify(key.public_key(), "v0001", SHA.upper(), sig)  # hex case does not matter
    with pytest.raises(SignatureError, match="does not verify"):
        verify(key.public_key(), "v0002", SHA, sig)  # moved to another version
    with pytest.raises(SignatureError, match="does not verify"):
        verify(key.public_key(), "v0001", "cd" * 32, sig)  # other weights
    with pytest.raises(SignatureError, match="does not verify"):
        verify(signing.generate_key().public_key(), "v0001", SHA, sig)  # someone else's key


@pytest.mark.parametrize(
    ("signature", "message"),
    [("", "unsigned"), ("not base64!", "not base64"), ("AAAA", "not 64")],
)
def test_malformed_signatures_are_refused(signature: str, message: str) -> None:
    key = signing.generate_key()
    with pytest.raises(SignatureError, match=message):
        verify(key.public_key(), "v0001", SHA, signature)


def test_key_files_round_trip_and_private_key_is_0600(tmp_path: Path) -> None:
    private, public = signing.write_key_pair(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    sig = sign_digest(signing.load_private_key(private), "v0001", SHA)
    verify(signing.load_public_key(public), "v0001", SHA, sig)
    with pytest.raises(FileExistsError):
        signing.write_key_pair(tmp_path / "keys")  # never overwrites a key
    with pytest.raises(ValueError, match="not an Ed25519 private"):
        signing.load_private_key(public)


def test_make_signing_key_script(tmp_path: Path) -> None:
    out = tmp_path / "k"
    run = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "make_signing_key.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    private = out / signing.PRIVATE_KEY_NAME
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = signing.load_private_key(private)
    verify(
        signing.load_public_key(out / signing.PUBLIC_KEY_NAME),
        "v1",
        SHA,
        sign_digest(key, "v1", SHA),
    )
    again = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "make_signing_key.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "refusing" in again.stderr


def test_publisher_signs_versions_and_the_assignment_carries_it(registry, tmp_path: Path) -> None:
    from learner.policy_service import PolicyServicer

    private, public = signing.write_key_pair(tmp_path / "keys")
    torch.manual_seed(0)
    model = UnifiedPolicy(policy_config("tiny", ("pick_cube",), ("overhead",)))
    manifest = Publisher(registry, tmp_path / "versions", signing_key=private).publish(
        model, training_step=1, data_seen=10
    )
    verify(
        signing.load_public_key(public), manifest.version_id, manifest.sha256, manifest.signature
    )
    on_disk = Manifest.from_json((tmp_path / "versions" / "v0001.json").read_text())
    assert on_disk.signature == manifest.signature
    assert registry.version("v0001").manifest["signature"] == manifest.signature
    servicer = PolicyServicer(registry)
    try:
        assignment = servicer._assignment("v0001", context=None)  # type: ignore[arg-type]
    finally:
        servicer.stop()
    assert assignment.signature == manifest.signature
    assert json.loads(assignment.manifest_json)["signature"] == manifest.signature

    unsigned = Publisher(registry, tmp_path / "versions").publish(
        model, training_step=2, data_seen=10
    )
    assert unsigned.signature == ""

"""Ed25519 signatures over policy versions: the learner signs, every cell verifies.

A SHA-256 in the manifest only proves the bytes arrived intact; anyone who can change the
registry or sit on the link can change the digest too. The signature binds the version id
to the digest of its weights with a key only the learner holds, so a cell runs nothing the
learner did not publish under that id.

What is signed: the bytes b"fleetlearn.policy.v1\\0" + version_id + b"\\0" + sha256 (lower-case
hex), so a signature can neither be moved to another version nor mistaken for a signature
over anything else made with the same key. The signature travels as standard base64 of the
64 raw Ed25519 signature bytes (88 characters).

Keys are PEM files: the private key PKCS#8 (unencrypted, file mode 0600), the public key
SubjectPublicKeyInfo.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

log = logging.getLogger(__name__)

PRIVATE_KEY_NAME = "policy_signing_key.pem"
PUBLIC_KEY_NAME = "policy_signing_key.pub.pem"
_DOMAIN = b"fleetlearn.policy.v1\0"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class SignatureError(ValueError):
    """A version's signature is missing, malformed, or not the learner's over these bytes."""


def signed_message(version_id: str, sha256_hex: str) -> bytes:
    """The exact bytes a version's signature covers."""
    if not version_id:
        raise ValueError("version_id must be non-empty")
    digest = sha256_hex.lower()
    if not _SHA256_HEX.match(digest):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256_hex!r}")
    return _DOMAIN + version_id.encode() + b"\0" + digest.encode()


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def sign_digest(private_key: Ed25519PrivateKey, version_id: str, sha256_hex: str) -> str:
    """Base64 Ed25519 signature over (version_id, sha256_hex)."""
    return base64.b64encode(private_key.sign(signed_message(version_id, sha256_hex))).decode()


def verify(public_key: Ed25519PublicKey, version_id: str, sha256_hex: str, signature: str) -> None:
    """Return if `signature` is the key's over (version_id, sha256_hex); else SignatureError."""
    if not signature:
        raise SignatureError(f"version {version_id} is unsigned; this cell requires signatures")
    try:
        raw = base64.b64decode(signature.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"version {version_id}: signature is not base64") from None
    if len(raw) != 64:
        raise SignatureError(f"version {version_id}: signature is {len(raw)} bytes, not 64")
    try:
        message = signed_message(version_id, sha256_hex)
    except ValueError as exc:
        raise SignatureError(f"version {version_id}: {exc}") from None
    try:
        public_key.verify(raw, message)
    except InvalidSignature:
        raise SignatureError(
            f"version {version_id}: signature does not verify with the learner's public key "
            f"(sha256 {sha256_hex[:16]}...)"
        ) from None


# -- key files ---------------------------------------------------------------------------


def save_private_key(key: Ed25519PrivateKey, path: Path) -> Path:
    """Write the private key as PEM, created with mode 0600 (never world-readable, not even
    for a moment); refuses to overwrite an existing file."""
    path = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)  # in case the umask was stricter than needed, or looser
    return path


def save_public_key(key: Ed25519PublicKey, path: Path) -> Path:
    path = Path(path)
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pem)
    return path


def write_key_pair(directory: Path) -> tuple[Path, Path]:
    """A fresh key pair in `directory`: (private key path, public key path)."""
    directory = Path(directory)
    key = generate_key()
    private = save_private_key(key, directory / PRIVATE_KEY_NAME)
    public = save_public_key(key.public_key(), directory / PUBLIC_KEY_NAME)
    log.info("wrote policy signing key pair %s, %s", private, public)
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("signing key %s is readable by others (mode %o); chmod 600 it", path, mode)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an Ed25519 private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an Ed25519 public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key

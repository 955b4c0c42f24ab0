"""TLS for every gRPC channel between cells and the learner, mutual TLS optional.

A lab keeps one directory of PEM files (made by ops/make_certs.py): `ca.pem` (the lab CA),
`learner.pem`/`learner.key` (the learner's server certificate) and `<cell_id>.pem`/
`<cell_id>.key` (one client certificate per cell, CN = cell id). Only grpc reads them here,
so a cell needs no crypto package beyond grpcio.

The edge opens its channels through `client_channel`, which uses the TLS settings this
process chose once at start-up (`use_client_tls`): the uplink, the policy watcher and the
heartbeat then all speak TLS, and carry the cell's token as call credentials
(fleet/common/cell_auth.py), without each of them carrying the settings or the token around.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fleet.common.cell_auth import call_credentials

log = logging.getLogger(__name__)

CA_FILE = "ca.pem"
LEARNER_NAME = "learner"


class TLSConfigError(RuntimeError):
    """A TLS directory lacks a file it needs; the message names the file."""


def _read(tls_dir: Path | str, name: str) -> bytes:
    path = Path(tls_dir) / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(
            f"TLS file {path} is missing; make the lab's certificates with "
            "`python ops/make_certs.py --out DIR --cells ...`"
        ) from None


def server_credentials(
    tls_dir: Path | str, require_client_cert: bool = False
) -> grpc.ServerCredentials:
    """The learner's certificate; with `require_client_cert` every peer must show a cell
    certificate signed by the lab CA (mutual TLS)."""
    return grpc.ssl_server_credentials(
        [(_read(tls_dir, f"{LEARNER_NAME}.key"), _read(tls_dir, f"{LEARNER_NAME}.pem"))],
        root_certificates=_read(tls_dir, CA_FILE),
        require_client_auth=require_client_cert,
    )


def channel_credentials(tls_dir: Path | str, cell_id: str | None) -> grpc.ChannelCredentials:
    """Trust the lab CA; present `<cell_id>.pem` as client certificate when the directory
    holds one (a learner without --mtls simply ignores it)."""
    ca = _read(tls_dir, CA_FILE)
    cert_path = Path(tls_dir) / f"{cell_id}.pem" if cell_id else None
    if cert_path is None or not cert_path.is_file():
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=_read(tls_dir, f"{cell_id}.key"),
        certificate_chain=cert_path.read_bytes(),
    )


def secure_channel(
    address: str,
    tls_dir: Path | str,
    cell_id: str | None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A TLS channel to `address` as `cell_id` (mutual TLS when its certificate exists)."""
    return grpc.secure_channel(address, channel_credentials(tls_dir, cell_id), list(options))


@dataclass(frozen=True)
class ClientTLS:
    tls_dir: Path
    cell_id: str | None
    token: str = ""

    def __repr__(self) -> str:  # never the token
        return f"ClientTLS({str(self.tls_dir)!r}, {self.cell_id!r})"


_client_lock = threading.Lock()
_client_tls: ClientTLS | None = None


def use_client_tls(tls_dir: Path | str | None, cell_id: str | None, token: str = "") -> None:
    """Choose this process's TLS settings and cell token for `client_channel` (None =
    plaintext, which carries no token: a token is only ever sent over TLS)."""
    global _client_tls
    with _client_lock:
        if tls_dir is None:
            if token:
                raise TLSConfigError(
                    f"cell {cell_id}: a token is only sent over TLS; give the TLS directory "
                    "(--tls-dir), or run learner and cell with --insecure and no token"
                )
            _client_tls = None
            return
        # Fail at start-up, not at the first reconnect, when a file is missing.
        channel_credentials(tls_dir, cell_id)
        _client_tls = ClientTLS(Path(tls_dir), cell_id, token)
    log.info("cell %s: gRPC channels use TLS from %s", cell_id or "-", tls_dir)


def client_tls() -> ClientTLS | None:
    with _client_lock:
        return _client_tls


def client_channel(address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to the learner: TLS when `use_client_tls` chose it, plaintext otherwise."""
    cfg = client_tls()
    if cfg is None:
        return grpc.insecure_channel(address, options=list(options))
    if not (cfg.token and cfg.cell_id):
        return secure_channel(address, cfg.tls_dir, cfg.cell_id, options)
    creds = grpc.composite_channel_credentials(
        channel_credentials(cfg.tls_dir, cfg.cell_id), call_credentials(cfg.cell_id, cfg.token)
    )
    return grpc.secure_channel(address, creds, list(options))


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The CN of the peer's verified client certificate, or None without one."""
    try:
        auth = context.auth_context()
    except Exception:  # a test double without auth_context
        return None
    names = auth.get("x509_common_name") or []
    if not names:
        return None
    value = names[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

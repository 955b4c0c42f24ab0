"""Who is calling, and may it act as that cell: call credentials, certificate, allow-list.

A cell sends its id and token as call credentials (fleet/common/cell_auth.py); over mutual TLS its
client certificate's CN must be that same id, so a leaked token does not let cell A's
machine act as cell B. When the learner has a tokens file, that file is the allow-list: a
cell missing from it is refused even with a CA-signed certificate, and removing a cell from
the file revokes it within `TokensFile.check_every_s` seconds, open streams included (each
stream checks again as it goes), with no restart. Without a tokens file (`--insecure` only)
anyone may call and the identity is whatever the caller claims.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fleet.common.cell_auth import CELL_KEY, MAX_TOKEN_LEN, TOKEN_KEY, token_of
from fleet.common.ids import MAX_ID_LEN
from fleet.common.tls import peer_common_name

log = logging.getLogger(__name__)

_SHOW = 64


class Refused(Exception):
    """A call the learner will not serve: the status code and what the person can do."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Caller:
    """The authenticated party of one call."""

    cell_id: str | None  # None only without a tokens file and without an id sent
    key: str  # what the per-cell stream cap counts against; "" = only the global cap
    token: str = field(default="", repr=False)

    def may_act_as(self, cell_id: str) -> str | None:
        """None when this caller may write or act as `cell_id`, else a message why not."""
        if self.cell_id is None or cell_id == self.cell_id:
            return None
        return (
            f"cell {cell_id[:_SHOW]!r}: this call is authenticated as cell {self.cell_id!r}; "
            "a cell may only act under its own cell_id"
        )


class TokensFile(Mapping[str, str]):
    """{cell_id: token} from a JSON file, read again when the file changes (checked at most
    every `check_every_s`). A file that fails to parse on reload keeps the previous list and
    logs an error, so a half-written edit never opens or closes the fleet by accident."""

    def __init__(self, path: Path, *, check_every_s: float = 1.0) -> None:
        self.path = Path(path)
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._tokens = _parse_tokens(self.path)  # a bad file fails at start-up
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _current(self) -> dict[str, str]:
        now = time.monotonic()
        with self._lock:
            if now - self._checked < self.check_every_s:
                return self._tokens
            self._checked = now
            signature = self._stat()
            if signature == self._signature:
                return self._tokens
            self._signature = signature
            try:
                tokens = _parse_tokens(self.path)
            except (OSError, ValueError) as exc:
                log.error(
                    "tokens file %s unreadable, keeping the previous list: %s", self.path, exc
                )
                return self._tokens
            gone = sorted(set(self._tokens) - set(tokens))
            added = sorted(set(tokens) - set(self._tokens))
            log.info(
                "tokens file %s reloaded: %d cells (revoked %s, added %s)",
                self.path,
                len(tokens),
                gone or "none",
                added or "none",
            )
            self._tokens = tokens
            return tokens

    def __getitem__(self, cell_id: str) -> str:
        return self._current()[cell_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


def _parse_tokens(path: Path) -> dict[str, str]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()
    ):
        raise ValueError(f"{path}: expected a JSON object of cell id -> non-empty token")
    return data


def authenticate(context: grpc.ServicerContext, tokens: Mapping[str, str] | None) -> Caller:
    """The caller of this call, or Refused (UNAUTHENTICATED / PERMISSION_DENIED)."""
    claimed, token = _metadata(context)
    cert_cn = peer_common_name(context)
    if cert_cn is not None and claimed and claimed != cert_cn:
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"cell {claimed[:_SHOW]!r}: this connection's client certificate is for "
            f"{cert_cn[:_SHOW]!r}; a cell may only act under its own cell_id",
        )
    cell_id = cert_cn or claimed or None
    if tokens is None:
        # Unauthenticated (--insecure) and no id sent: only the global cap applies (cells in
        # one process share one connection, so a per-connection cap would count them as one).
        return Caller(cell_id, cell_id or "", token)
    if cell_id is None:
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            f"no cell id: send the cell's id and token as call credentials (metadata "
            f"{CELL_KEY!r} and {TOKEN_KEY!r}: 'Bearer TOKEN')",
        )
    expected = tokens.get(cell_id)
    if expected is None:
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"cell {cell_id[:_SHOW]!r} is not in the learner's tokens file (revoked, or "
            "never added); add it there to let it in",
        )
    if not token:
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            f"cell {cell_id[:_SHOW]!r}: no token; send it as call credentials "
            f"({TOKEN_KEY!r}: 'Bearer TOKEN')",
        )
    if not hmac.compare_digest(expected.encode("utf-8"), token.encode("utf-8", "replace")):
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            f"cell {cell_id[:_SHOW]!r}: wrong token; check the cell's configured token",
        )
    return Caller(cell_id, cell_id, token)


def still_allowed(caller: Caller, tokens: Mapping[str, str] | None) -> str | None:
    """None while `caller` is still on the allow-list with its token, else why not."""
    if tokens is None or caller.cell_id is None:
        return None
    expected = tokens.get(caller.cell_id)
    if expected is not None and hmac.compare_digest(
        expected.encode("utf-8"), caller.token.encode("utf-8", "replace")
    ):
        return None
    return (
        f"cell {caller.cell_id!r} was revoked (removed from the learner's tokens file, or its "
        "token changed); this stream is closed"
    )


def _metadata(context: grpc.ServicerContext) -> tuple[str, str]:
    cell_id, token = "", ""
    for key, value in context.invocation_metadata() or ():
        if not isinstance(value, str):
            continue
        if key == CELL_KEY:
            cell_id = value
        elif key == TOKEN_KEY:
            token = token_of(value)
    if len(cell_id) > MAX_ID_LEN or len(token) > MAX_TOKEN_LEN:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"call metadata too long: cell id at most {MAX_ID_LEN} characters, token at most "
            f"{MAX_TOKEN_LEN}",
        )
    return cell_id, token

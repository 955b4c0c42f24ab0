"""A cell's identity on every call: its id and token as gRPC call credentials (metadata).

Why metadata and not a message field: a message is spooled to the cell's disk, logged and
kept; call credentials live only in the channel, are sent only over TLS (gRPC refuses call
credentials on a plaintext channel) and let the learner admit or refuse a stream from its
headers, before it reads a byte of the payload. The learner reads them back with
`learner.auth.call_identity`.
"""

from __future__ import annotations

import grpc

CELL_KEY = "fleet-cell-id"
TOKEN_KEY = "authorization"
_BEARER = "Bearer "
MAX_TOKEN_LEN = 256


def cell_metadata(cell_id: str, token: str) -> tuple[tuple[str, str], ...]:
    """The metadata pairs a cell's calls carry (what the call credentials add)."""
    pairs = [(CELL_KEY, cell_id)]
    if token:
        pairs.append((TOKEN_KEY, _BEARER + token))
    return tuple(pairs)


def token_of(value: str) -> str:
    """The token in an `authorization` value ("" when it is not a bearer token)."""
    return value[len(_BEARER) :] if value.startswith(_BEARER) else ""


class _CellCredentials(grpc.AuthMetadataPlugin):
    """Adds the cell's id and token to each call. Its repr never shows the token."""

    def __init__(self, cell_id: str, token: str) -> None:
        self._pairs = cell_metadata(cell_id, token)
        self._cell_id = cell_id

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        callback(self._pairs, None)

    def __repr__(self) -> str:
        return f"CellCredentials({self._cell_id!r})"


def call_credentials(cell_id: str, token: str) -> grpc.CallCredentials:
    """Call credentials for `cell_id`; compose them with TLS channel credentials."""
    return grpc.metadata_call_credentials(_CellCredentials(cell_id, token), name="fleet-cell")

"""Who may write as which cell: its token, its client certificate, or both.

A cell proves itself with the token the learner holds for it, or (over mutual TLS) with a
client certificate whose CN is its cell id. A certificate for another cell is refused even
with a valid token: a leaked token must not let cell A's machine write cell B's episodes.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

_SHOW = 64


def check_cell(
    cell_id: str,
    token: str,
    *,
    tokens: Mapping[str, str] | None,
    cert_cn: str | None,
) -> str | None:
    """None when the peer may act as `cell_id`, else a message saying why not."""
    shown = repr(cell_id[:_SHOW])
    if cert_cn is not None and cert_cn != cell_id:
        return (
            f"cell {shown}: this connection's client certificate is for {cert_cn[:_SHOW]!r}; "
            "a cell may only write under its own cell_id"
        )
    if tokens is None:
        return None
    expected = tokens.get(cell_id)
    if expected is not None and hmac.compare_digest(
        expected.encode("utf-8"), token.encode("utf-8", "replace")
    ):
        return None
    if cert_cn == cell_id and not token:
        return None  # the certificate alone authenticates it
    if expected is None and cert_cn is None:
        return f"cell {shown}: unknown cell; add it to the learner's tokens file"
    return f"cell {shown}: wrong token; check the cell's configured token"

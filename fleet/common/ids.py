"""The one rule for ids that become file or directory names: cells, episodes, cameras,
policy versions.

Why one rule: a cell id is a directory in the episode store and in the cell's spool, a
camera name is a zarr array's name, a version id is a directory of weights. A leading letter
or digit keeps out ".", "..", hidden and option-like names; "zarr.json" would collide with
the group metadata beside the episode directories. The edge checks its config with the same
rule the learner applies to every chunk, so a bad name fails at start-up, not at ingest.
"""

from __future__ import annotations

import re

MAX_ID_LEN = 128
ID_RULE = (
    f"1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit, no '..'"
)

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED_IDS = frozenset({"zarr.json"})


def is_safe_id(value: str) -> bool:
    """True when `value` can be used as one path component (see the module docstring)."""
    return (
        0 < len(value) <= MAX_ID_LEN
        and _SAFE_ID.fullmatch(value) is not None
        and ".." not in value
        and value not in _RESERVED_IDS
    )

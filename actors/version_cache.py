"""The cell's on-disk cache of policy versions, content-addressed by SHA-256.

A restart, or a rollback to a version the cell ran before, then needs no fetch: the watcher
asks for the assignment's digest and gets the bytes from disk. Nothing here is trusted
blindly: every read hashes the file again (a bad disk or a hand-edited file is dropped, not
loaded), and the watcher still checks the signature on the bytes it gets back.

Files are `<sha256>.safetensors`, written atomically (temp file + rename), so a crash mid-write
leaves no entry. The cache is bounded in bytes; the least recently used entries go first
(use touches a file's mtime).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = ".safetensors"


class VersionCache:
    """Verified weights on disk, keyed by their SHA-256; at most `max_bytes` in all."""

    def __init__(self, directory: Path, *, max_bytes: int = 2 << 30, cell_id: str = "") -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.cell_id = cell_id
        self.hits = 0
        self.misses = 0
        self.dropped = 0  # entries found corrupt and removed
        for stale in self.directory.glob(".*.tmp"):  # a write cut short by a crash
            stale.unlink(missing_ok=True)

    def _path(self, sha256_hex: str) -> Path:
        digest = sha256_hex.lower()
        if not _SHA256_HEX.match(digest):
            raise ValueError(f"not a sha256 hex digest: {sha256_hex!r}")
        return self.directory / f"{digest}{_SUFFIX}"

    def get(self, sha256_hex: str) -> bytearray | None:
        """The cached bytes whose SHA-256 is `sha256_hex`, hashed again now; None if absent or
        corrupt (a corrupt entry is deleted). A bytearray of its own, read in one copy, that
        the caller may build a model on (see PolicyWatcher's runner factory)."""
        path = self._path(sha256_hex)
        try:
            with path.open("rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                data = bytearray(size)
                got = f.readinto(data)
                while got < size:
                    more = f.readinto(memoryview(data)[got:])
                    if not more:
                        raise OSError(f"file shrank while read ({got} of {size} bytes)")
                    got += more
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError as exc:
            log.warning("cell %s: version cache entry %s unreadable: %s", self.cell_id, path, exc)
            self.misses += 1
            return None
        if hashlib.sha256(data).hexdigest() != sha256_hex.lower():
            log.error(
                "cell %s: version cache entry %s does not match its sha256; dropping it",
                self.cell_id,
                path.name,
            )
            path.unlink(missing_ok=True)
            self.dropped += 1
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        self.hits += 1
        return data

    def contains(self, sha256_hex: str) -> bool:
        """Whether an entry for the digest exists (not hashed now: `get` checks it)."""
        return self._path(sha256_hex).exists()

    def put(self, data: bytes | bytearray, sha256_hex: str, *, verified: bool = False) -> bool:
        """Store bytes under their digest (hashed here unless the caller just `verified`
        them); False if they do not fit. Evicts least recently used entries to stay within
        max_bytes.

        Written atomically (temp file + rename) but not fsynced: `get` hashes every entry
        it reads, so a file torn by a power cut is found and dropped, and a cell does not
        spend the sync of ~100 MB (seconds on a slow SD card) beside its control loop."""
        if not verified and hashlib.sha256(data).hexdigest() != sha256_hex.lower():
            raise ValueError("bytes do not match the sha256 they are to be cached under")
        if len(data) > self.max_bytes:
            log.warning(
                "cell %s: version %s... (%d bytes) exceeds the cache bound (%d); not cached",
                self.cell_id,
                sha256_hex[:12],
                len(data),
                self.max_bytes,
            )
            return False
        path = self._path(sha256_hex)
        if path.exists():
            os.utime(path)
            return True
        self._evict(room_for=len(data), keep=path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            log.warning("cell %s: could not cache version %s...: %s", self.cell_id, path, exc)
            return False
        return True

    def entries(self) -> list[tuple[str, int]]:
        """(sha256, size) of each entry, least recently used first."""
        out = []
        for path in self.directory.glob(f"*{_SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime_ns, path.name[: -len(_SUFFIX)], st.st_size))
        out.sort()
        return [(digest, size) for _, digest, size in out]

    @property
    def size_bytes(self) -> int:
        return sum(size for _, size in self.entries())

    def _evict(self, *, room_for: int, keep: Path) -> None:
        entries = self.entries()
        total = sum(size for _, size in entries)
        for digest, size in entries:
            if total + room_for <= self.max_bytes:
                break
            path = self._path(digest)
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            log.info(
                "cell %s: version cache evicted %s... (%d bytes)", self.cell_id, digest[:12], size
            )

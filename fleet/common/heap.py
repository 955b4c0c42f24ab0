"""Keep freed heap memory in the process instead of handing it back to the kernel at once.

Why: ingest allocates and frees megabytes a chunk (the received message, its parse, the
frames). glibc returns a freed block of 128 kB or more to the kernel (mmap, or trimming the
heap top), so the next chunk's buffers fault every page in again. On this project's VMs a
page fault is expensive: measured, the store's append cost 2.9 ms of CPU a chunk with the
defaults and 1.4 ms with freed memory kept. The cost is memory held: at most `trim_bytes`
free above each allocator arena's live data.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def keep_freed_memory(
    *, mmap_bytes: int = MMAP_THRESHOLD_BYTES, trim_bytes: int = TRIM_THRESHOLD_BYTES
) -> bool:
    """Serve blocks below `mmap_bytes` from the heap and keep up to `trim_bytes` of freed
    heap; False (and nothing changed) where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_bytes)
    )
    if not ok:
        log.warning("mallopt refused the heap thresholds; freed memory goes back at once")
    return ok

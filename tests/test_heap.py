"""keep_freed_memory: a freed multi-megabyte buffer stays in the process for the next one."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import ctypes, sys
from fleet.common.heap import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
buf = bytearray(8 << 20)  # a chunk's worth of frames
del buf
print(libc.mallinfo2().fordblks >> 20)  # MiB freed but still held by the process
"""


def _free_mib_after_a_big_free(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_freed_buffers_are_kept_for_reuse_only_when_asked() -> None:
    # glibc's default: an 8 MiB block is mmapped and unmapped on free (its pages refault).
    assert _free_mib_after_a_big_free("default") < 8
    # Kept: the next chunk's buffers reuse the same, already mapped, pages.
    assert _free_mib_after_a_big_free("keep") >= 8

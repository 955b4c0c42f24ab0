"""Polling for a condition that other threads or processes bring about (tests only)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], object], timeout_s: float = 10.0, poll_s: float = 0.01
) -> bool:
    """True as soon as `predicate()` is truthy; after `timeout_s`, its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return bool(predicate())


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    """As wait_until, but a timeout fails the test naming what never happened."""
    if not wait_until(predicate, timeout_s, poll_s=0.02):
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")

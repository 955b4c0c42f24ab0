"""Shared fixtures: one private redis-server for the whole test session; two simulated
follower chains."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fleet.control.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL of a private redis-server on a free loopback port (no disk writes)."""
    with RedisServer() as server:
        yield server.url


def wipe_default_registry(redis_url: str) -> None:
    """Delete every key under the registry's default prefix. What a test starts itself (a
    Gateway, `fleet learner`) uses that prefix in the session's shared Redis, so a test that
    reads it wipes it first and after, and never sees another test's versions."""
    from fleet.control.registry import Registry

    reg = Registry(redis_url)
    try:
        for key in reg.r.scan_iter(f"{reg.prefix}*"):
            reg.r.delete(key)
    finally:
        reg.close()


@pytest.fixture
def registry(redis_server: str):
    """A Registry under a prefix of its own, so tests never see each other's keys."""
    from fleet.control.registry import Registry

    reg = Registry(redis_server, prefix=f"test:{uuid.uuid4().hex[:12]}:")
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray for one test module, unless one is already running (then it is reused)."""
    import ray

    started = not ray.is_initialized()
    if started:
        _start_local_ray()
    yield
    if started:
        ray.shutdown()


def _start_local_ray(attempts: int = 3) -> None:
    """Start a 2-CPU local Ray, trying again when its own startup fails.

    On a loaded 2-core CI machine Ray's raylet or GCS can miss Ray's internal startup
    timeout; that is the test machine's state, not the code under test, so a fresh start
    is tried (and the failure printed) before the module's tests are failed.
    """
    import sys
    import time

    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:  # Ray raises a bare Exception on startup timeouts
            print(f"ray.init attempt {attempt}/{attempts} failed: {exc!r}", file=sys.stderr)
            ray.shutdown()
            if attempt == attempts:
                raise
            time.sleep(2.0 * attempt)


@pytest.fixture
def follower_chains() -> Iterator[dict[str, Any]]:
    """Two simulated 7-servo follower chains ("left", "right"), each a ServoPeer process on
    a pty, closed after the test."""
    from drivers.sim.servo_peer import ServoPeer

    peers: dict[str, ServoPeer] = {}
    try:
        for side in ("left", "right"):
            peers[side] = ServoPeer(range(1, 8)).start()
        yield peers
    finally:
        for p in peers.values():
            p.close()

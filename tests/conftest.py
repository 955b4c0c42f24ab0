"""Shared fixtures: one private redis-server for the whole test session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from fleet.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """URL of a private redis-server on a free loopback port (no disk writes)."""
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def registry(redis_server: str):
    """A Registry under a prefix of its own, so tests never see each other's keys."""
    from fleet.registry import Registry

    reg = Registry(redis_server, prefix=f"test:{uuid.uuid4().hex[:12]}:")
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray for one test module, unless one is already running (then it is reused)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()

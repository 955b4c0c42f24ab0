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

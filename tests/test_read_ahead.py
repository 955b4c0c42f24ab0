"""read_ahead keeps ingest's stream reading bounded, ordered and honest about failures."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from learner.read_ahead import read_ahead
from tests.waiting import wait_for


class Source:
    """An iterator that counts how far it has been read and can fail at a given item."""

    def __init__(self, n: int, *, fail_at: int | None = None) -> None:
        self.n = n
        self.fail_at = fail_at
        self.taken = 0
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[int]:
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    raise ConnectionError(f"stream broke at {i}")
                self.taken = i + 1
                yield i
        finally:
            self.closed.set()


def test_items_arrive_in_order_and_all_of_them() -> None:
    assert list(read_ahead(iter(Source(500)), depth=2)) == list(range(500))


def test_the_sources_error_is_raised_where_it_happened() -> None:
    got: list[int] = []
    with pytest.raises(ConnectionError, match="broke at 7"):
        for item in read_ahead(iter(Source(20, fail_at=7))):
            got.append(item)
    assert got == list(range(7))  # every item before the failure was delivered first


def test_a_slow_consumer_holds_the_reader_back() -> None:
    """Backpressure: the reader is never more than depth + 1 items ahead (one queued per
    depth, one in its hand), so a slow store stops reading and flow control does the rest."""
    src = Source(1000)
    items = read_ahead(iter(src), depth=1)
    assert next(items) == 0
    wait_for(lambda: src.taken >= 2, 5, "the reader to fetch ahead")
    threading.Event().wait(0.2)  # time to run further ahead, if it could
    assert src.taken <= 3
    assert next(items) == 1
    wait_for(lambda: src.taken >= 3, 5, "the reader to fetch the next")
    threading.Event().wait(0.2)
    assert src.taken <= 4


def test_closing_the_consumer_stops_the_reader() -> None:
    src = Source(10_000)
    items = read_ahead(iter(src), depth=1)
    assert next(items) == 0
    items.close()  # the RPC ended early (cancelled, or the handler returned)
    wait_for(src.closed.is_set, 5, "the reader to leave the source")
    assert src.taken < 10

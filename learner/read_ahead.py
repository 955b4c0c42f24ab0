"""Read a request stream one message ahead of its consumer, on a thread of its own.

Why: ingest stores a chunk (file writes, which release the GIL) and then reads the next one
(gRPC receive and protobuf parse). Done in turn, one stream uses one core at a time; read one
ahead, the next chunk arrives while the current one is written. The queue holds at most
`depth` messages, so a slow store still stops reading and gRPC flow control still holds the
cell back: memory stays bounded at (depth + 2) messages a stream.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()
_POLL_S = 0.5  # how often a blocked reader checks whether its consumer has gone


class StreamIdle(TimeoutError):
    """The source yielded nothing for the consumer's idle timeout."""


class _Failed:
    """The reader's exception, carried to the consumer's thread and raised there."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def read_ahead(
    source: Iterator[T],
    *,
    depth: int = 1,
    name: str = "read-ahead",
    idle_timeout_s: float | None = None,
) -> Iterator[T]:
    """Yield `source`'s items in order while a daemon thread fetches the next ones.

    An exception raised by `source` is raised to the consumer at the same position. When the
    consumer stops early (the generator is closed), the reader stops at its next item. When
    the consumer has waited `idle_timeout_s` for the next item, StreamIdle is raised to it
    (the reader stays blocked until the source ends, which closing the call brings about).
    """
    items: queue.Queue[object] = queue.Queue(maxsize=depth)
    gone = threading.Event()

    def put(item: object) -> bool:
        while not gone.is_set():
            try:
                items.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for item in source:
                if not put(item):
                    return
        except BaseException as exc:  # carried to the consumer, which decides
            put(_Failed(exc))
            return
        put(_END)

    thread = threading.Thread(target=read, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = items.get(timeout=idle_timeout_s)
            except queue.Empty:
                raise StreamIdle(f"nothing received for {idle_timeout_s} s") from None
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        gone.set()

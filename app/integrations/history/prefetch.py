"""Reading ahead on a background thread: the one helper behind the history reader and Hive's block fetcher."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()


@contextlib.contextmanager
def prefetched(produce: Callable[[], Iterator[T]], *, depth: int, name: str) -> Iterator[Iterator[T]]:
    """The items of produce(), made on a background thread at most `depth` ahead of the consumer.

    An exception in the producer is raised in the consumer, at the point it would have reached that item.
    Leaving the block stops the producer (its generator is closed, so its own clean-up runs) and drains the queue.
    """
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        source = produce()
        try:
            for item in source:
                if not put(item):
                    return
        except BaseException as exc:  # raised again in the consuming thread
            put(exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            put(_DONE)

    def consume() -> Iterator[T]:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                items.get_nowait()
        thread.join(timeout=60)

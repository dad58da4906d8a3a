"""Work beside the network: the next band of tiles is read and cut while the current one runs,
finished bands are encoded and written while the next ones run, and two batches of tiles are in
the network at once (`in_flight`), so its cores do not idle between one batch's kernels.

Two small threads, each one item ahead of the main thread, which keeps the network: TensorFlow
releases the GIL in its kernels and uses every core for them, so the threads mostly wait (on
the queue, on the disk, on numpy copies that release the GIL too) and are not counted as
cores. One item ahead is all the overlap a steady stream needs, and keeps memory flat: one
extra band of input tiles and one of output beyond the sequential pass, whatever the height.

What the overlap can win was measured first (benchmarks/predict.py, part d: 4096^2 16-bit
slide, 16 filters, depth 4, 64 tiles of 700, 2 shared cores): reading, normalising, mirroring,
cutting, stitching, encoding and writing together cost 1.3 s against 36-170 s of network
(under 1 %, whatever the load); start-up (imports 9.6 s, model load 1.4 s, the first trace
4.3 s) is the rest of the gap between the whole process and the forward pass.

An exception in a thread is raised again in the main thread, as itself (a reader's DataError
names the slide, a writer's error the output); an exception in the main thread (a bad band,
Ctrl-C) stops both threads before it goes on, so the writer's temporary file is removed
(`files.atomic_path`) and no partial output is left.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POLL = 0.1  # seconds between checks that the other side still runs
_DONE = object()


class _Failed:
    """An exception crossing from one thread to the other."""

    def __init__(self, error: BaseException):
        self.error = error


class Aborted(Exception):
    """Raised inside a background writer when the main thread gave up on the output."""


def prefetch(items: Iterable[T], ahead: int = 1, name: str = "unetcell-reader") -> Iterator[T]:
    """`items`, produced in a background thread `ahead` items before they are asked for, in
    order. `ahead=0` iterates in the caller's thread (the sequential reference).

    At most `ahead` items wait beside the one in use: the thread starts an item only when a
    slot is free, so memory grows by `ahead` items, not by the queue. An exception raised
    while producing an item is raised here at that item; closing this generator early (an
    error downstream, Ctrl-C) stops the thread before close returns.
    """
    if ahead <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue()
    slots = threading.Semaphore(ahead)
    stop = threading.Event()

    def produce() -> None:
        iterator = iter(items)
        try:
            while True:
                while not slots.acquire(timeout=_POLL):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    item = next(iterator)
                except StopIteration:
                    ready.put(_DONE)
                    return
                ready.put(item)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
            ready.put(_Failed(e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            slots.release()  # the next item is made while this one is used
            yield item
    finally:
        stop.set()
        thread.join()


def in_flight(call: Callable[[T], R], items: Iterable[T], width: int = 2,
              name: str = "unetcell-network") -> Iterator[R]:
    """`call(item)` for each item, in order, with up to `width` calls running at once in a
    small thread pool (`width` 1: one after the other in the caller's thread).

    For the network: one batch alone leaves part of the cores idle between its kernels (1.9
    of 2 cores busy), two batches in flight fill them (2.0): 8-13 % faster on 2 cores in one
    measurement, 0.976 x in a later one (benchmarks/predict.py, part d prints both side by
    side); every call is the same, so the results are too. Closing
    early cancels the calls not yet started and waits for the running ones.
    """
    if width <= 1:
        for item in items:
            yield call(item)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(width, thread_name_prefix=name) as pool:
        try:
            for item in items:
                pending.append(pool.submit(call, item))
                if len(pending) >= width:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


class Behind(Generic[T, R]):
    """`consume(items)` run in a background thread over the items `send` gives it, one item
    behind the caller; a context manager.

    On leaving the block normally, the items end, the thread is joined and `result` holds what
    `consume` returned; an exception `consume` raised is raised in the caller's thread (at
    the next `send`, or on leaving). On leaving with an exception, `consume`'s iterator raises
    `Aborted` so it cleans up (an `atomic_path` removes its temporary file), the thread is
    joined, and the caller's exception goes on.
    """

    def __init__(self, consume: Callable[[Iterator[T]], R], ahead: int = 1, name: str = "unetcell-writer"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(ahead, 1))
        self._error: BaseException | None = None
        self.result: R | None = None
        self._thread = threading.Thread(target=self._run, args=(consume,), name=name, daemon=True)
        self._thread.start()

    def _items(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
            del item  # not held while waiting for the next one: items may be large bands

    def _run(self, consume: Callable[[Iterator[T]], R]) -> None:
        try:
            self.result = consume(self._items())
        except BaseException as e:  # noqa: BLE001  (raised again in the caller's thread)
            self._error = e

    def _put(self, item) -> None:
        while True:
            if self._error is not None or not self._thread.is_alive():
                return
            try:
                self._queue.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self._error is not None and not isinstance(self._error, Aborted):
            raise self._error

    def send(self, item: T) -> None:
        self._raise()
        self._put(item)
        self._raise()

    def __enter__(self) -> Behind[T, R]:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self._put(_DONE)
            self._thread.join()
            self._raise()
            return
        self._put(_Failed(Aborted(f"stopped by {kind.__name__}")))
        self._thread.join()

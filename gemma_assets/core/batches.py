"""Re-iterable streams of token batches: how every fitting loop reads data larger than memory."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar, overload

import numpy as np
import torch

T = TypeVar("T")

# called once per pass over the data; each call yields [n, d] batches afresh
Batches = Callable[[], Iterable[torch.Tensor]]
# batches with the window id of each token: what per-window sums (and intervals) are made from
WindowBatches = Callable[[], Iterator[tuple[torch.Tensor, np.ndarray]]]


def as_batches(data: torch.Tensor | Batches, rows: int = 65536) -> Batches:
    """A tensor as a re-iterable stream of row batches; a callable is returned as is."""
    if callable(data):
        return data
    return lambda: (data[start : start + rows] for start in range(0, len(data), rows))


@overload
def map_data(data: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...
@overload
def map_data(data: Batches, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batches: ...
@overload
def map_data(data: torch.Tensor | Batches, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | Batches: ...
def map_data(data: torch.Tensor | Batches, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | Batches:
    """fn applied to a tensor, or lazily to every batch of a stream. A stream that carries its
    own maps (engine.Partitioned, whose workers apply them) gets `fn` added to them."""
    carried = getattr(data, "mapped", None)
    if carried is not None:
        return carried(fn)
    if callable(data):
        return lambda: (fn(batch) for batch in data())
    return fn(data)


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """`items`, produced on a background thread up to `depth` ahead of the consumer: reading and
    decoding the next batch (zarr, zstd and torch release the GIL) overlaps the work on this one.
    The producer's exception is raised here, in order; a consumer that stops early stops it."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put((item, None))
        except BaseException as error:  # handed to the consumer, raised in its thread
            ready.put((None, error))
            return
        ready.put((done, None))

    worker = threading.Thread(target=produce, daemon=True, name="gemma-assets-prefetch")
    worker.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()

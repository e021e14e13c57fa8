"""Re-iterable streams of token batches: how every fitting loop reads data larger than memory."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# called once per pass over the data; each call yields [n, d] batches afresh
Batches = Callable[[], Iterable[torch.Tensor]]


def as_batches(data: torch.Tensor | Batches, rows: int = 65536) -> Batches:
    """A tensor as a re-iterable stream of row batches; a callable is returned as is."""
    if callable(data):
        return data
    return lambda: (data[start : start + rows] for start in range(0, len(data), rows))


def map_data(data: torch.Tensor | Batches, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | Batches:
    """fn applied to a tensor, or lazily to every batch of a stream."""
    if callable(data):
        return lambda: (fn(batch) for batch in data())
    return fn(data)

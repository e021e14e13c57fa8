"""Residual-stream extraction with early exit.

A forward hook on decoder block L captures its output and raises to stop the forward:
only blocks 0..L run and no logits are computed. The captured tensor is exactly
`hidden_states[L + 1]` of a full forward (truncating `model.layers` instead would return
the output after the final norm, not the residual stream).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gemma_assets.core import progress
from gemma_assets.core.config import RunConfig
from gemma_assets.core.sampling import TokenSample
from gemma_assets.core.storage import ActivationStore, PartitionWriter

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class NonFiniteActivationsError(RuntimeError):
    """The model produced NaN/Inf activations; the message names the windows."""


class _StopForward(Exception):
    pass


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM (Gemma-2 and -3 keep them at .model.layers)."""
    layers = model.base_model.layers
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} keeps no list of decoder blocks at .{model.base_model_prefix}.layers")
    return layers


@torch.no_grad()
def residual_stream(model: PreTrainedModel, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Output of block `layer` for input_ids [batch, seq] -> [batch, seq, d_model]."""
    captured: list[torch.Tensor] = []

    def capture(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(capture)
    try:
        model.base_model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


# rows handed to the store writer: (the partition's host buffer, rows [0, stop) of it final once
# `ready()` returns)
RowsReady = Callable[[np.ndarray, int, Callable[[], None]], None]


def extract_windows(
    model: PreTrainedModel,
    tokens: np.ndarray,
    layer: int,
    batch_size: int,
    device: str,
    on_progress: Callable[[int], None] | None = None,
    on_rows: RowsReady | None = None,
) -> np.ndarray:
    """bf16 bit patterns [windows * context_len, d_model] of block `layer` for token windows;
    `on_progress(rows done)` after each batch (on CUDA after every tenth of them).

    On CUDA the bf16 results are copied into pinned host memory without blocking, and the
    NaN/Inf test stays on the device: the GPU is synchronised only for the ~10 progress reports.
    `on_rows` gets each batch as soon as its copy is issued, with a `ready()` that waits for that
    copy alone, so the batch can be compressed and written while the next one is computed.
    """
    n_windows, context_len = tokens.shape
    d_model = model.config.hidden_size
    cuda = device.startswith("cuda")
    out = torch.empty((n_windows * context_len, d_model), dtype=torch.int16, pin_memory=cuda)
    bits = out.numpy().view(np.uint16)
    nonfinite = []  # per window, on the device
    n_batches = -(-n_windows // batch_size)
    report_every = max(1, n_batches // 10) if cuda else 1
    for number, start in enumerate(range(0, n_windows, batch_size), start=1):
        batch = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64)).to(device)
        hidden = residual_stream(model, batch, layer)
        nonfinite.append((~torch.isfinite(hidden)).flatten(1).any(1))
        rows = slice(start * context_len, (start + len(batch)) * context_len)
        out[rows].copy_(hidden.reshape(-1, d_model).to(torch.bfloat16).view(torch.int16), non_blocking=cuda)
        if on_rows is not None:
            copied = torch.cuda.Event() if cuda else None
            if copied is not None:
                copied.record()
            on_rows(bits, rows.stop, copied.synchronize if copied is not None else lambda: None)
        if on_progress is not None and (number % report_every == 0 or number == n_batches):
            if cuda:
                torch.cuda.synchronize(device)
            on_progress(rows.stop)
    if cuda:
        torch.cuda.synchronize(device)
    bad = torch.cat(nonfinite).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteActivationsError(
            f"block {layer} produced NaN/Inf activations in windows {bad[:10]}: the model weights "
            "or dtype are broken (try dtype float32, or reload the model)"
        )
    return bits


class WriteQueue:
    """Store writes on one background thread, in submission order, at most `depth` jobs behind
    the producer (which then waits for the oldest). A job's exception, and its `on_done`
    callback, surface in the producer's thread when the job is collected."""

    def __init__(self, depth: int = 8) -> None:
        self.depth = depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._pending: deque[tuple[Future, Callable[[Any], None] | None]] = deque()

    def submit(self, job: Callable[[], Any], on_done: Callable[[Any], None] | None = None) -> None:
        self._pending.append((self._pool.submit(job), on_done))
        while len(self._pending) > self.depth:
            self._collect()

    def drain(self) -> None:
        while self._pending:
            self._collect()

    def _collect(self) -> None:
        future, on_done = self._pending.popleft()
        result = future.result()
        if on_done is not None:
            on_done(result)

    def __enter__(self) -> WriteQueue:
        return self

    def __exit__(self, *exc_info) -> None:
        for future, _ in self._pending:
            future.cancel()  # after a failure: nothing more is written, uncommitted versions stay invisible
        self._pool.shutdown(wait=True)


def per_token_arrays(window_sample: TokenSample) -> dict[str, np.ndarray]:
    """Per-token arrays stored beside the activations, row-aligned with them."""
    n_windows, context_len = window_sample.tokens.shape
    return {
        "token_ids": window_sample.tokens.reshape(-1),
        "positions": np.tile(np.arange(context_len, dtype=np.int32), n_windows),
        "doc_ids": np.repeat(window_sample.doc_ids, context_len),
        "doc_offsets": (window_sample.starts[:, None] + np.arange(-1, context_len - 1)).reshape(-1),
        "strata": np.repeat(window_sample.strata, context_len),
    }


def store_attributes(run: RunConfig, tokenizer, sample: TokenSample, dtype: torch.dtype) -> dict:
    """What every partition records about how it was made (readers check these)."""
    return {
        "model": run.model.name,
        "layer": run.model.layer,
        "hook_name": run.model.hook_name,
        "context_len": run.sampling.context_len,
        "bos_token_id": tokenizer.bos_token_id,
        "vocab_size": len(tokenizer),
        "stratum_names": list(sample.stratum_names),
        "compute_dtype": str(dtype),
    }


@dataclass(frozen=True)
class ExtractionRecord:
    partitions: int
    tokens: int
    d_model: int
    tokens_per_s: float


def extract_partitions(
    lm: PreTrainedModel,
    sample: TokenSample,
    keys: Sequence[str],
    run: RunConfig,
    store: ActivationStore,
    attrs: dict,
    batch_size: int,
    device: str,
    log: Callable[[str], None],
) -> ExtractionRecord:
    """Residual stream after block L of every window of `keys`, each partition committed
    atomically to `store` as exact bf16 with its per-token arrays; `log` gets a line per
    committed partition, and the extraction's progress goes to the progress listeners.

    Overlapped: each batch is compressed and written on a background thread while the next one
    is computed; a partition is committed once all its rows are written and found finite."""
    started = time.perf_counter()
    d_model = lm.config.hidden_size
    committed = 0

    def logged(key: str, manifest: dict) -> None:
        nonlocal committed
        committed += 1
        rate = committed * run.sampling.tokens_per_partition / (time.perf_counter() - started)
        log(
            f"committed partition {key} ({committed}/{len(keys)}): {manifest['n_tokens']} tokens, "
            f"{rate:,.0f} tokens/s overall"
        )

    per_partition = run.sampling.tokens_per_partition
    extracted = progress.task(f"extracting {len(keys)} partitions", len(keys) * per_partition, "tokens").start()
    with WriteQueue() as queue:
        for number, key in enumerate(keys):
            part = sample.partition(run.partition_keys.index(key), run.sampling.windows_per_partition)
            writer = store.writer(key, part.tokens.size, d_model)

            def rows_done(rows: int, before: int = number * per_partition) -> None:
                extracted.update(before + rows)

            def hand_over(
                bits: np.ndarray, stop: int, ready: Callable[[], None], writer: PartitionWriter = writer
            ) -> None:
                def write() -> None:
                    ready()
                    writer.write_rows(bits, stop)

                queue.submit(write)

            try:
                extract_windows(lm, part.tokens, run.model.layer, batch_size, device, rows_done, hand_over)
            except NonFiniteActivationsError:
                queue.drain()
                writer.abort()
                raise
            arrays = per_token_arrays(part)
            queue.submit(partial(writer.commit, arrays, attrs), partial(logged, key))
        queue.drain()
    extracted.finish()
    tokens = len(keys) * run.sampling.tokens_per_partition
    return ExtractionRecord(len(keys), tokens, d_model, tokens / (time.perf_counter() - started))

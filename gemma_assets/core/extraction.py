"""Residual-stream extraction with early exit.

A forward hook on decoder block L captures its output and raises to stop the forward:
only blocks 0..L run and no logits are computed. The captured tensor is exactly
`hidden_states[L + 1]` of a full forward (truncating `model.layers` instead would return
the output after the final norm, not the residual stream).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gemma_assets.core.config import RunConfig
from gemma_assets.core.sampling import TokenSample
from gemma_assets.core.storage import ActivationStore


class NonFiniteActivationsError(RuntimeError):
    """The model produced NaN/Inf activations; the message names the windows."""


class _StopForward(Exception):
    pass


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def residual_stream(model: torch.nn.Module, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Output of block `layer` for input_ids [batch, seq] -> [batch, seq, d_model]."""
    captured: list[torch.Tensor] = []

    def capture(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(capture)
    try:
        model.model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def extract_windows(
    model: torch.nn.Module,
    tokens: np.ndarray,
    layer: int,
    batch_size: int,
    device: str,
    on_progress: Callable[[int, float], None] | None = None,
) -> np.ndarray:
    """bf16 bit patterns [windows * context_len, d_model] of block `layer` for token windows.

    On CUDA the bf16 results are copied into pinned host memory without blocking, and the
    NaN/Inf test stays on the device: the GPU is synchronised only for the ~10 progress reports.
    """
    n_windows, context_len = tokens.shape
    d_model = model.config.hidden_size
    cuda = device.startswith("cuda")
    out = torch.empty((n_windows * context_len, d_model), dtype=torch.int16, pin_memory=cuda)
    nonfinite = []  # per window, on the device
    n_batches = -(-n_windows // batch_size)
    report_every = max(1, n_batches // 10)
    started = time.perf_counter()
    for number, start in enumerate(range(0, n_windows, batch_size), start=1):
        batch = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64)).to(device)
        hidden = residual_stream(model, batch, layer)
        nonfinite.append((~torch.isfinite(hidden)).flatten(1).any(1))
        rows = slice(start * context_len, (start + len(batch)) * context_len)
        out[rows].copy_(hidden.reshape(-1, d_model).to(torch.bfloat16).view(torch.int16), non_blocking=cuda)
        if on_progress is not None and (number % report_every == 0 or number == n_batches):
            if cuda:
                torch.cuda.synchronize(device)
            done = rows.stop
            on_progress(done, done / (time.perf_counter() - started))
    if cuda:
        torch.cuda.synchronize(device)
    bad = torch.cat(nonfinite).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteActivationsError(
            f"block {layer} produced NaN/Inf activations in windows {bad[:10]}: the model weights "
            "or dtype are broken (try dtype float32, or reload the model)"
        )
    return out.numpy().view(np.uint16)


def partition_arrays(window_sample: TokenSample, acts_bits: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token arrays stored beside the activations, row-aligned with them."""
    n_windows, context_len = window_sample.tokens.shape
    return {
        "activations": acts_bits,
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
    lm: torch.nn.Module,
    sample: TokenSample,
    keys: Sequence[str],
    run: RunConfig,
    store: ActivationStore,
    attrs: dict,
    batch_size: int,
    device: str,
    log: Callable[[str], None],
    detail: Callable[[str], None] = lambda _: None,
) -> ExtractionRecord:
    """Residual stream after block L of every window of `keys`, each partition committed
    atomically to `store` as exact bf16 with its per-token arrays; `log` gets a line per
    partition, `detail` about ten per partition."""
    started = time.perf_counter()
    per_partition = run.sampling.tokens_per_partition
    for done, key in enumerate(keys):
        part = sample.partition(run.partition_keys.index(key), run.sampling.windows_per_partition)

        def progress(tokens: int, rate: float, key: str = key) -> None:
            detail(f"partition {key}: {tokens} tokens, {rate:,.0f} tokens/s")

        bits = extract_windows(lm, part.tokens, run.model.layer, batch_size, device, progress)
        manifest = store.write_partition(key, partition_arrays(part, bits), attrs)
        rate = (done + 1) * per_partition / (time.perf_counter() - started)
        log(
            f"committed partition {key} ({done + 1}/{len(keys)}): {manifest['n_tokens']} tokens, "
            f"{rate:,.0f} tokens/s overall"
        )
    tokens = len(keys) * per_partition
    return ExtractionRecord(len(keys), tokens, lm.config.hidden_size, tokens / (time.perf_counter() - started))

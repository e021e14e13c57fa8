"""Residual-stream extraction with early exit.

A forward hook on decoder block L captures its output and raises to stop the forward:
only blocks 0..L run and no logits are computed. The captured tensor is exactly
`hidden_states[L + 1]` of a full forward (truncating `model.layers` instead would return
the output after the final norm, not the residual stream).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch


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

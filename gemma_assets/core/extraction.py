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

from gemma_assets.core.bf16 import bf16_to_bits


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
    """bf16 bit patterns [windows * context_len, d_model] of block `layer` for token windows."""
    n_windows, context_len = tokens.shape
    d_model = model.config.hidden_size
    out = np.empty((n_windows * context_len, d_model), np.uint16)
    started = time.perf_counter()
    for start in range(0, n_windows, batch_size):
        batch = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64)).to(device)
        hidden = residual_stream(model, batch, layer)
        if not torch.isfinite(hidden).all():
            bad = (~torch.isfinite(hidden)).flatten(1).any(1).nonzero().flatten() + start
            raise NonFiniteActivationsError(
                f"block {layer} produced NaN/Inf activations in windows {bad.tolist()[:10]}: the "
                "model weights or dtype are broken (try dtype float32, or reload the model)"
            )
        rows = slice(start * context_len, (start + len(batch)) * context_len)
        out[rows] = bf16_to_bits(hidden.reshape(-1, d_model))
        if on_progress is not None:
            done = min(start + batch_size, n_windows) * context_len
            on_progress(done, done / (time.perf_counter() - started))
    return out

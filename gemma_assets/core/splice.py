"""Downstream loss: next-token cross-entropy with block L's output replaced by a reconstruction.

Every run sees the same windows. The replacement covers every position but the first (BOS),
which no dictionary was fitted on. Baselines as in SAELens' evals: clean (no replacement),
zero-ablation (the residual set to 0) and mean-ablation (set to the train mean);
loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean).

Blocks 0..L compute the same thing for every replacement, so they run once per batch of
windows (the clean pass, which also records block L's output). Each replacement then runs the
model's own forward with blocks 0..L standing in as pass-throughs that hand back the recorded
(and replaced) output: embedding, rotary tables and masks are the model's own code, only
blocks L+1..end and the unembedding cost time. The log-softmax over the vocabulary runs in
chunks of positions, so memory holds one chunk's logits, not a batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from gemma_assets.core import progress
from gemma_assets.core.extraction import decoder_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Replacement = Callable[[torch.Tensor], torch.Tensor]  # raw activations [n, d] -> [n, d]

LOGIT_CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk of positions


class _Recorded(torch.nn.Module):
    """Stands in for a block whose output is known: blocks before L pass their input through
    (nothing reads it), block L returns the recorded output."""

    def __init__(self, output: torch.Tensor | None) -> None:
        super().__init__()
        self.output = output

    def forward(self, hidden_states: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
        return hidden_states if self.output is None else self.output


@contextmanager
def _prefix_replaced(model: PreTrainedModel, layer: int, output: torch.Tensor) -> Iterator[None]:
    layers = decoder_layers(model)
    originals = [layers[i] for i in range(layer + 1)]
    for i in range(layer):
        layers[i] = _Recorded(None)
    layers[layer] = _Recorded(output)
    try:
        yield
    finally:
        for i, block in enumerate(originals):
            layers[i] = block


def _logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2 caps the final logits
    return torch.tanh(logits / cap) * cap if cap else logits


def _summed_cross_entropy(model: PreTrainedModel, hidden: torch.Tensor, input_ids: torch.Tensor) -> np.ndarray:
    """Summed next-token CE of each window [b] from the final hidden states [b, T, d]."""
    b, t, d = hidden.shape
    flat, targets = hidden[:, :-1].reshape(-1, d), input_ids[:, 1:].reshape(-1)
    chunk = max(1, LOGIT_CHUNK_BYTES // (4 * model.get_output_embeddings().out_features))
    losses = []
    for start in range(0, len(flat), chunk):
        logits = _logits(model, flat[start : start + chunk])
        target = targets[start : start + chunk, None]
        losses.append(torch.logsumexp(logits, 1) - logits.gather(1, target)[:, 0])
    return torch.cat(losses).reshape(b, t - 1).sum(1).double().cpu().numpy()


@torch.no_grad()
def _clean_pass(model: PreTrainedModel, input_ids: torch.Tensor, layer: int) -> tuple[np.ndarray, torch.Tensor]:
    """Clean summed CE per window and block `layer`'s output."""
    recorded: list[torch.Tensor] = []

    def record(_module, _inputs, output):
        recorded.append(output)

    handle = decoder_layers(model)[layer].register_forward_hook(record)
    try:
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    finally:
        handle.remove()
    (block_output,) = recorded
    if not isinstance(block_output, torch.Tensor):
        raise TypeError(
            f"block {layer} returns {type(block_output).__name__}, not a tensor (transformers before 5): "
            "install transformers>=5 as pyproject requires"
        )
    return _summed_cross_entropy(model, hidden, input_ids), block_output


@torch.no_grad()
def _spliced(
    model: PreTrainedModel, input_ids: torch.Tensor, layer: int, block_output: torch.Tensor, replace: Replacement
) -> np.ndarray:
    rest = block_output[:, 1:]
    replaced = replace(rest.reshape(-1, rest.shape[-1]).float()).to(block_output).reshape(rest.shape)
    with _prefix_replaced(model, layer, torch.cat([block_output[:, :1], replaced], 1)):
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    return _summed_cross_entropy(model, hidden, input_ids)


def cross_entropies(
    model: PreTrainedModel,
    windows: np.ndarray,
    layer: int,
    replacements: dict[str, Replacement],
    batch_size: int,
    device: str,
) -> dict[str, np.ndarray]:
    """Summed next-token CE (nats) of each of `windows` [w, T], clean (key "clean") and under
    each replacement of block `layer`'s output at positions 1..T-1: [w] per key, over the T-1
    predictions of each window (the mean CE is the sum over windows / (w (T-1))). Progress counts
    windows through the model, once clean and once per replacement."""
    if "clean" in replacements:
        raise ValueError("'clean' names the unreplaced model; give the replacement another name")
    per_window: dict[str, list[np.ndarray]] = {name: [] for name in ["clean", *replacements]}
    passes = len(windows) * (1 + len(replacements))
    with progress.task(f"spliced CE of {len(replacements)} replacements", passes, "window passes") as done:
        for start in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[start : start + batch_size].astype(np.int64)).to(device)
            clean, block_output = _clean_pass(model, ids, layer)
            per_window["clean"].append(clean)
            done.advance(len(ids))
            for name, replace in replacements.items():
                per_window[name].append(_spliced(model, ids, layer, block_output, replace))
                done.advance(len(ids))
    return {name: np.concatenate(losses) for name, losses in per_window.items()}


def loss_recovered(spliced: float, clean: float, ablated: float) -> float:
    """Share of the ablation's CE increase that the reconstruction recovers (1 = clean, 0 = ablated)."""
    return (ablated - spliced) / (ablated - clean) if ablated != clean else float("nan")

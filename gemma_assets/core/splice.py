"""Downstream loss: next-token cross-entropy with block L's output replaced by a reconstruction.

Every run sees the same windows. The replacement covers every position but the first (BOS),
which no dictionary was fitted on. Baselines as in SAELens' evals: clean (no replacement),
zero-ablation (the residual set to 0) and mean-ablation (set to the train mean);
loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gemma_assets.core.extraction import decoder_layers

Replacement = Callable[[torch.Tensor], torch.Tensor]  # raw activations [n, d] -> [n, d]


@torch.no_grad()
def _window_cross_entropy(model: torch.nn.Module, input_ids: torch.Tensor) -> np.ndarray:
    """Summed next-token CE of each window [b] over its predicted positions."""
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    )
    return loss.reshape(len(input_ids), -1).sum(1).double().cpu().numpy()


def cross_entropies(
    model: torch.nn.Module,
    windows: np.ndarray,
    layer: int,
    replacements: dict[str, Replacement | None],
    batch_size: int,
    device: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Summed next-token CE (nats) of each of `windows` [w, T] under each replacement of block
    `layer`'s output at positions 1..T-1 (None: the clean model): [w] per replacement, over the
    T-1 predictions of each window (the mean CE is the sum over windows / (w (T-1)))."""
    per_window: dict[str, list[np.ndarray]] = {name: [] for name in replacements}
    current: list[Replacement | None] = [None]

    def splice(_module, _inputs, output):
        if current[0] is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        rest = hidden[:, 1:]
        replaced = current[0](rest.reshape(-1, rest.shape[-1]).float()).to(hidden).reshape(rest.shape)
        hidden = torch.cat([hidden[:, :1], replaced], 1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(model)[layer].register_forward_hook(splice)
    try:
        for start in range(0, len(windows), batch_size):
            ids = torch.from_numpy(windows[start : start + batch_size].astype(np.int64)).to(device)
            for name, replacement in replacements.items():
                current[0] = replacement
                per_window[name].append(_window_cross_entropy(model, ids))
            if on_progress is not None:
                on_progress(min(start + batch_size, len(windows)), len(windows))
    finally:
        handle.remove()
    return {name: np.concatenate(losses) for name, losses in per_window.items()}


def loss_recovered(spliced: float, clean: float, ablated: float) -> float:
    """Share of the ablation's CE increase that the reconstruction recovers (1 = clean, 0 = ablated)."""
    return (ablated - spliced) / (ablated - clean) if ablated != clean else float("nan")

"""One reconstruction-metric suite for every dictionary (k-means variants and SAEs alike).

FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated tokens, computed
here in float64 (SAELens' and SAEBench's "explained variance" once squared E[x^2]).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained of x_hat [n, d] as a reconstruction of x [n, d]."""
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@dataclass
class ReconstructionMetrics:
    """Streaming accumulator; feed (x, x_hat, active-features-per-token) batch by batch."""

    n_tokens: int = 0
    sum_sq_error: float = 0.0
    sum_sq_norm: float = 0.0
    sum_x: np.ndarray | None = None
    sum_cosine: float = 0.0
    sum_l0: float = 0.0
    d_model: int = 0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, l0: torch.Tensor) -> None:
        x64, err = x.double(), (x - x_hat).double()
        if self.sum_x is None:
            self.sum_x, self.d_model = np.zeros(x.shape[1]), x.shape[1]
        self.n_tokens += len(x)
        self.sum_sq_error += float((err**2).sum())
        self.sum_sq_norm += float((x64**2).sum())
        self.sum_x += x64.sum(0).numpy()
        self.sum_cosine += float(torch.nn.functional.cosine_similarity(x64, x_hat.double(), dim=1).sum())
        self.sum_l0 += float(l0.double().sum())

    def result(self) -> dict[str, float]:
        if not self.n_tokens:
            raise ValueError("no tokens were evaluated: the held-out split is empty")
        total_variance = self.sum_sq_norm - float(self.sum_x @ self.sum_x) / self.n_tokens
        return {
            "fvu": self.sum_sq_error / total_variance,
            "mse": self.sum_sq_error / (self.n_tokens * self.d_model),
            "cosine": self.sum_cosine / self.n_tokens,
            "l0": self.sum_l0 / self.n_tokens,
            "n_tokens": self.n_tokens,
        }


Reconstructor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def evaluate(batches: Iterable[torch.Tensor], reconstruct: Reconstructor) -> dict[str, float]:
    """The metric suite of a dictionary over batches of raw activations.

    `reconstruct(x)` returns (x_hat [n, d] in raw units, active features per token [n]).
    """
    metrics = ReconstructionMetrics()
    for x in batches:
        x_hat, n_active = reconstruct(x)
        metrics.update(x, x_hat, n_active)
    return metrics.result()

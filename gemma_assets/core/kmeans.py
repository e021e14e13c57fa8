"""K-means in torch: k-means++ seeding, exact Lloyd iterations with batched distance GEMMs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from gemma_assets.core.profiles import ConfigError
from gemma_assets.core.whitening import Preprocessor

_ROWS_PER_GEMM = 8192


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, d] float32
    inertia_curve: list[float]  # sum of squared distances after each assignment step
    n_iter: int
    converged: bool
    fit_seconds: float
    sizes: torch.Tensor  # [k] points per cluster at the last assignment


def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of x [n, d]: (labels [n], squared distances [n])."""
    c_sq = (centroids**2).sum(1)
    labels, dist = [], []
    for start in range(0, len(x), _ROWS_PER_GEMM):
        rows = x[start : start + _ROWS_PER_GEMM]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; argmin does not need ||x||^2
        partial = torch.addmm(c_sq, rows, centroids.T, alpha=-2.0)
        best, label = partial.min(1)
        labels.append(label)
        dist.append((best + (rows**2).sum(1)).clamp_min_(0))
    return torch.cat(labels), torch.cat(dist)


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn): 2 + log(k) candidates per step, keep the best."""
    trials = 2 + int(math.log(k))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[torch.randint(len(x), (1,), generator=generator).item()]
    closest = ((x - centroids[0]) ** 2).sum(1)
    x_sq = (x**2).sum(1)
    for i in range(1, k):
        weights = closest.double().cpu()
        picks = torch.multinomial(weights / weights.sum(), trials, replacement=True, generator=generator)
        candidates = x[picks.to(x.device)]  # [trials, d]
        dist = (x_sq[:, None] - 2 * x @ candidates.T + (candidates**2).sum(1)).clamp_min_(0)  # [n, trials]
        updated = torch.minimum(closest[:, None], dist)
        best = updated.double().sum(0).argmin()
        centroids[i] = candidates[best]
        closest = updated[:, best]
    return centroids


def fit_kmeans(
    x: torch.Tensor,
    k: int,
    max_iter: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> KMeansResult:
    """Lloyd's algorithm until the relative inertia change is below tol, or max_iter steps.

    Empty clusters are re-seeded with the points farthest from their centroids.
    """
    n = len(x)
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if k > n:
        raise ConfigError(f"k={k} exceeds the {n} training tokens: lower k or sample more tokens")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    centroids = init.clone() if init is not None else kmeans_plusplus(x, k, generator)
    curve: list[float] = []
    converged = False
    for _ in range(max_iter):
        labels, dist = assign(x, centroids)
        curve.append(float(dist.double().sum()))
        sizes = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        empty = (sizes == 0).nonzero().flatten()
        centroids = sums / sizes.clamp_min(1).unsqueeze(1).to(x.dtype)
        if len(empty):
            centroids[empty] = x[dist.topk(len(empty)).indices]
        if len(curve) > 1 and abs(curve[-2] - curve[-1]) <= tol * curve[-2]:
            converged = True
            break
    labels, dist = assign(x, centroids)
    curve.append(float(dist.double().sum()))
    return KMeansResult(
        centroids=centroids,
        inertia_curve=curve,
        n_iter=len(curve) - 1,
        converged=converged,
        fit_seconds=time.perf_counter() - started,
        sizes=torch.bincount(labels, minlength=k),
    )


@dataclass(frozen=True)
class KMeansDictionary:
    """Centroids in a preprocessed space; a token is reconstructed as its nearest centroid."""

    centroids: torch.Tensor  # [k, d] in preprocessed space
    preprocessor: Preprocessor

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat in raw units [n, d], active features per token [n] = 1)."""
        labels, _ = assign(self.preprocessor.forward(x), self.centroids)
        return self.preprocessor.inverse(self.centroids[labels]), torch.ones(len(x))

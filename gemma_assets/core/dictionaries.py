"""Clustering-derived dictionaries with more than one reconstruction shape, so clustering can be
set beside SAEs on an L0-FVU frontier. All reconstruct in raw units; all ignore nothing.

- GainShapeDictionary: spherical k-means directions; a token is its mean plus the best
  direction scaled by its projection (L0 = 1, one free coefficient, like a 1-sparse SAE).
- MatchingPursuitDictionary: greedy residual coding with m atoms from a fixed dictionary
  (e.g. unit-norm k-means centroids): L0 = m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma_assets.core.kmeans import Batches, KMeansResult, fit_kmeans, map_data


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class GainShapeDictionary:
    directions: torch.Tensor  # [k, d] unit rows
    mean: torch.Tensor  # [d]

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centred = x - self.mean
        scores = centred @ self.directions.T  # [n, k] projections
        best = scores.abs().argmax(1)
        gain = scores.gather(1, best[:, None])
        return self.mean + gain * self.directions[best], torch.ones(len(x))


def fit_gain_shape(
    train: torch.Tensor | Batches, mean: torch.Tensor, k: int, **kmeans_args
) -> tuple[GainShapeDictionary, KMeansResult]:
    """Spherical k-means: k-means on centred unit vectors (a tensor or a stream of batches),
    centroids renormalised."""
    result = fit_kmeans(map_data(train, lambda x: unit_rows(x - mean)), k, **kmeans_args)
    return GainShapeDictionary(unit_rows(result.centroids), mean), result


@dataclass(frozen=True)
class MatchingPursuitDictionary:
    atoms: torch.Tensor  # [k, d] unit rows
    mean: torch.Tensor  # [d]
    m: int  # atoms per token

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x - self.mean
        used = torch.zeros(len(x), len(self.atoms), dtype=torch.bool)
        for _ in range(self.m):
            scores = residual @ self.atoms.T  # [n, k]
            best = scores.abs().argmax(1)
            residual = residual - scores.gather(1, best[:, None]) * self.atoms[best]
            used[torch.arange(len(x)), best] = True
        return x - residual, used.sum(1)

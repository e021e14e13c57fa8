"""Clustering-derived dictionaries with more than one reconstruction shape, so clustering can be
set beside SAEs on an L0-FVU frontier. All decode into raw units.

- GainShapeDictionary: spherical k-means directions; a token is its mean plus the best
  direction scaled by its projection (L0 = 1, one free coefficient, like a 1-sparse SAE).
- MatchingPursuitDictionary: greedy residual coding with m atoms from a fixed dictionary
  (e.g. unit-norm k-means centroids): L0 = m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma_assets.core.batches import Batches, map_data
from gemma_assets.core.codes import Codes, Dictionary, unit_rows
from gemma_assets.core.kmeans import KMeansDictionary, KMeansResult, fit_kmeans
from gemma_assets.core.records import Family
from gemma_assets.core.whitening import Preprocessor

TOP_M = (4, 16)  # atoms per token for the greedy residual code over k-means directions


@dataclass(frozen=True)
class _Atoms:
    """Unit atoms around a mean: the directions tokens are coded with."""

    atoms: torch.Tensor  # [k, d] unit rows
    mean: torch.Tensor  # [d]

    @property
    def n_features(self) -> int:
        return len(self.atoms)

    def directions(self) -> torch.Tensor:
        return self.atoms


@dataclass(frozen=True)
class GainShapeDictionary(_Atoms):
    """A token is the mean plus its best unit atom times its projection on it (L0 = 1).
    Leader clustering's exemplars read the same way."""

    signed: bool = True  # best atom by |projection|; False: by projection (the nearest on the sphere)

    def encode(self, x: torch.Tensor) -> Codes:
        scores = (x.float() - self.mean) @ self.atoms.T  # [n, k] projections
        best = (scores.abs() if self.signed else scores).argmax(1)
        return Codes.one_hot(best, scores.gather(1, best[:, None])[:, 0])

    def decode(self, codes: Codes) -> torch.Tensor:
        return self.mean + codes.values * self.atoms[codes.indices[:, 0]]


def fit_gain_shape(
    train: torch.Tensor | Batches, mean: torch.Tensor, k: int, **kmeans_args
) -> tuple[GainShapeDictionary, KMeansResult]:
    """Spherical k-means: k-means on centred unit vectors (a tensor or a stream of batches),
    centroids renormalised."""
    result = fit_kmeans(map_data(train, lambda x: unit_rows(x - mean)), k, label="spherical k-means", **kmeans_args)
    return GainShapeDictionary(unit_rows(result.centroids), mean), result


@dataclass(frozen=True)
class MatchingPursuitDictionary(_Atoms):
    """Greedy residual codes with m atoms per token (L0 = m)."""

    m: int = 1

    def encode(self, x: torch.Tensor) -> Codes:
        """Greedy residual coding; an atom picked twice accumulates one coefficient."""
        residual = x - self.mean
        coefficients = torch.zeros(len(x), len(self.atoms), dtype=x.dtype)
        rows = torch.arange(len(x))
        for _ in range(self.m):
            scores = residual @ self.atoms.T  # [n, k]
            best = scores.abs().argmax(1)
            step = scores[rows, best]
            residual = residual - step[:, None] * self.atoms[best]
            coefficients[rows, best] += step
        return Codes.from_dense(coefficients)

    def decode(self, codes: Codes) -> torch.Tensor:
        return self.mean + codes.dense(len(self.atoms)) @ self.atoms


@dataclass(frozen=True)
class Member:
    """One dictionary of the comparison, with the names the report groups it by."""

    name: str
    family: Family
    dictionary: Dictionary
    m: int | None = 1  # features per token by construction (None: varies per token)


def clustering_family(
    k: int, centroids: torch.Tensor, gain_shape_atoms: torch.Tensor, preprocessor: Preprocessor
) -> list[Member]:
    """k-means-k read three ways: nearest centroid (L0 = 1), its spherical gain-shape twin
    (L0 = 1 with a free scale) and greedy residual codes over its directions (L0 = m)."""
    kmeans = KMeansDictionary(centroids, preprocessor)
    mean = preprocessor.shift
    return [
        Member(f"kmeans-{k}", Family.KMEANS, kmeans),
        Member(f"gain-shape-{k}", Family.GAIN_SHAPE, GainShapeDictionary(gain_shape_atoms, mean)),
        *[
            Member(
                f"top{m}-kmeans-{k}",
                Family.TOP_M,
                MatchingPursuitDictionary(kmeans.directions(), mean, m),
                m,
            )
            for m in TOP_M
            if m < k
        ],
    ]

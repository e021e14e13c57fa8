"""Streaming activation statistics in float64 with exact merges (Chan et al.)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

NORM_BIN_EDGES = np.logspace(-3, 7, 201)  # token L2 norms, log-spaced bins


@dataclass
class ActivationMoments:
    """Count, mean, co-moment matrix, extrema, non-finite count and norm histogram."""

    d_model: int
    count: int = 0
    mean: np.ndarray = field(init=False)
    comoment: np.ndarray = field(init=False)  # sum of (x - mean)(x - mean)^T
    minimum: np.ndarray = field(init=False)
    maximum: np.ndarray = field(init=False)
    nonfinite: int = 0
    norm_sum: float = 0.0
    norm_histogram: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mean = np.zeros(self.d_model)
        self.comoment = np.zeros((self.d_model, self.d_model))
        self.minimum = np.full(self.d_model, np.inf)
        self.maximum = np.full(self.d_model, -np.inf)
        self.norm_histogram = np.zeros(len(NORM_BIN_EDGES) - 1, np.int64)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch x [n, d]; rows with NaN/Inf are counted, not accumulated."""
        finite = torch.isfinite(x).all(1)
        self.nonfinite += int((~finite).sum())
        batch = x[finite].double().numpy()
        if len(batch):
            other = ActivationMoments(self.d_model)
            other.count = len(batch)
            other.mean = batch.mean(0)
            centred = batch - other.mean
            other.comoment = centred.T @ centred
            other.minimum, other.maximum = batch.min(0), batch.max(0)
            norms = np.linalg.norm(batch, axis=1)
            other.norm_sum = float(norms.sum())
            other.norm_histogram = np.histogram(norms, NORM_BIN_EDGES)[0]
            self.merge(other)

    def merge(self, other: ActivationMoments) -> None:
        """Fold another accumulator in; exact, so partitions can be combined in any order."""
        total = self.count + other.count
        if other.count:
            delta = other.mean - self.mean
            self.comoment += other.comoment + np.outer(delta, delta) * (self.count * other.count / total)
            self.mean = self.mean + delta * (other.count / total)
            self.minimum = np.minimum(self.minimum, other.minimum)
            self.maximum = np.maximum(self.maximum, other.maximum)
        self.count = total
        self.nonfinite += other.nonfinite
        self.norm_sum += other.norm_sum
        self.norm_histogram += other.norm_histogram

    @property
    def covariance(self) -> np.ndarray:
        return self.comoment / max(self.count - 1, 1)

    @property
    def variance(self) -> np.ndarray:
        return np.diag(self.covariance).copy()

    def save(self, path) -> None:
        np.savez(
            path,
            count=self.count,
            mean=self.mean,
            comoment=self.comoment,
            minimum=self.minimum,
            maximum=self.maximum,
            nonfinite=self.nonfinite,
            norm_sum=self.norm_sum,
            norm_histogram=self.norm_histogram,
        )

    @classmethod
    def load(cls, path) -> ActivationMoments:
        with np.load(path) as data:
            moments = cls(int(data["mean"].shape[0]))
            moments.count, moments.nonfinite = int(data["count"]), int(data["nonfinite"])
            moments.norm_sum = float(data["norm_sum"])
            for name in ("mean", "comoment", "minimum", "maximum", "norm_histogram"):
                setattr(moments, name, data[name])
        return moments

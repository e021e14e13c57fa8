"""Whitening from a streamed covariance: centring, PCA and ZCA with an eigenvalue floor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PREPROCESSINGS = ("center", "zca")


@dataclass(frozen=True)
class Whitening:
    mean: np.ndarray  # [d]
    eigenvalues: np.ndarray  # [d], descending, after the floor
    eigenvectors: np.ndarray  # [d, d], columns
    floor: float

    @classmethod
    def fit(cls, mean: np.ndarray, covariance: np.ndarray, relative_floor: float = 1e-6) -> Whitening:
        values, vectors = np.linalg.eigh(covariance)
        values, vectors = values[::-1], vectors[:, ::-1]
        floor = float(relative_floor * max(values[0], np.finfo(float).tiny))
        return cls(mean, np.maximum(values, floor), np.ascontiguousarray(vectors), floor)

    def zca_matrix(self) -> np.ndarray:
        return (self.eigenvectors / np.sqrt(self.eigenvalues)) @ self.eigenvectors.T

    def zca_inverse_matrix(self) -> np.ndarray:
        return (self.eigenvectors * np.sqrt(self.eigenvalues)) @ self.eigenvectors.T

    def save(self, path) -> None:
        np.savez(path, mean=self.mean, eigenvalues=self.eigenvalues, eigenvectors=self.eigenvectors, floor=self.floor)

    @classmethod
    def load(cls, path) -> Whitening:
        with np.load(path) as data:
            return cls(data["mean"], data["eigenvalues"], data["eigenvectors"], float(data["floor"]))


@dataclass(frozen=True)
class Preprocessor:
    """An affine map into the space a clustering is fitted in, and its inverse."""

    shift: torch.Tensor  # [d]
    forward_matrix: torch.Tensor | None  # [d, d]; None = identity
    inverse_matrix: torch.Tensor | None

    @classmethod
    def from_whitening(cls, kind: str, whitening: Whitening) -> Preprocessor:
        shift = torch.from_numpy(whitening.mean).float()
        if kind == "center":
            return cls(shift, None, None)
        if kind == "zca":
            return cls(
                shift,
                torch.from_numpy(whitening.zca_matrix()).float(),
                torch.from_numpy(whitening.zca_inverse_matrix()).float(),
            )
        raise ValueError(f"unknown preprocessing {kind!r}; valid: {', '.join(PREPROCESSINGS)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self.shift
        return centred if self.forward_matrix is None else centred @ self.forward_matrix

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        raw = z if self.inverse_matrix is None else z @ self.inverse_matrix
        return raw + self.shift


def identity_deviation(whitened: torch.Tensor) -> float:
    """max |cov(whitened) - I|: how far held-out data is from white after the transform."""
    z = whitened.double()
    cov = torch.cov(z.T)
    return float((cov - torch.eye(len(cov), dtype=cov.dtype)).abs().max())

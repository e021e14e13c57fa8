"""Whitening from a streamed covariance: centring, PCA and ZCA with an eigenvalue floor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gemma_assets.core.files import load_arrays, save_arrays

PREPROCESSINGS = ("none", "center", "standardize", "pca", "zca")


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

    def save(self, path: Path) -> None:
        save_arrays(path, vars(self))

    @classmethod
    def load(cls, path: Path) -> Whitening:
        arrays = load_arrays(path)
        return cls(arrays["mean"], arrays["eigenvalues"], arrays["eigenvectors"], float(arrays["floor"]))


@dataclass(frozen=True)
class Preprocessor:
    """An affine map into the space a clustering is fitted in, and its inverse."""

    shift: torch.Tensor  # [d]
    forward_matrix: torch.Tensor | None  # [d, r]; None = identity
    inverse_matrix: torch.Tensor | None  # [r, d]

    @classmethod
    def from_whitening(cls, kind: str, whitening: Whitening, n_components: int = 0) -> Preprocessor:
        """none | center | standardize (per-dim) | pca (whitened principal components) | zca.

        n_components > 0 keeps only the leading principal components: with "center" a plain PCA
        projection, with "pca" a whitened one (the inverse maps back into that subspace).
        """
        if kind not in PREPROCESSINGS:
            raise ValueError(f"unknown preprocessing {kind!r}; valid: {', '.join(PREPROCESSINGS)}")
        if n_components and kind not in ("center", "pca"):
            raise ValueError(f"n_components applies to 'center' and 'pca', not {kind!r}")
        d = len(whitening.mean)
        shift = torch.from_numpy(whitening.mean).float() if kind != "none" else torch.zeros(d)
        vectors = whitening.eigenvectors[:, : n_components or d]
        values = whitening.eigenvalues[: n_components or d]
        if kind in ("none", "center") and not n_components:
            return cls(shift, None, None)
        if kind == "center":
            forward, inverse = vectors, vectors.T
        elif kind == "standardize":
            std = np.sqrt((whitening.eigenvectors**2 * whitening.eigenvalues).sum(1))
            forward, inverse = np.diag(1 / std), np.diag(std)
        elif kind == "pca":
            forward, inverse = vectors / np.sqrt(values), (vectors * np.sqrt(values)).T
        else:
            forward, inverse = whitening.zca_matrix(), whitening.zca_inverse_matrix()
        return cls(
            shift,
            torch.from_numpy(np.ascontiguousarray(forward)).float(),
            torch.from_numpy(np.ascontiguousarray(inverse)).float(),
        )

    @property
    def dim(self) -> int:
        """Dimensions of the space it maps into."""
        return len(self.shift) if self.forward_matrix is None else self.forward_matrix.shape[1]

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

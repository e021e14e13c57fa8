"""Streaming activation statistics in float64 with exact merges (Chan et al.)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gemma_assets.core.files import load_arrays, save_arrays

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

    def update(self, x: torch.Tensor, norms: torch.Tensor | None = None) -> None:
        """Add a batch x [n, d] float32 (row norms optional, if already computed); rows with
        NaN/Inf are counted, not accumulated."""
        finite = torch.isfinite(x.sum(1))  # one reduction: NaN/Inf anywhere in a row propagates
        self.nonfinite += int((~finite).sum())
        if not finite.all():
            x, norms = x[finite], None if norms is None else norms[finite]
        if not len(x):
            return
        other = ActivationMoments(self.d_model)
        other.count = len(x)
        mean = x.sum(0, dtype=torch.float64) / len(x)
        # float64 throughout: a float32 co-moment loses the low-variance directions whitening
        # needs (covariance condition numbers of residual streams reach 1e6 and more)
        centred = (x.double() - mean).numpy()
        other.mean = mean.numpy()
        # numpy computes a matrix times its own transpose with BLAS syrk (one triangle, half the
        # products of torch's gemm here: 1.8x faster at d 2304), the same float64 sums
        other.comoment = centred.T @ centred
        other.minimum, other.maximum = x.amin(0).double().numpy(), x.amax(0).double().numpy()
        norms = (x.norm(dim=1) if norms is None else norms).double().numpy()
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

    def save(self, path: Path) -> None:
        save_arrays(path, vars(self))

    @classmethod
    def load(cls, path: Path) -> ActivationMoments:
        arrays = load_arrays(path)
        arrays.pop("d_model", None)  # files before it was saved lack it; the mean has its length
        moments = cls(len(arrays["mean"]))

        moments.count, moments.nonfinite = int(arrays.pop("count")), int(arrays.pop("nonfinite"))
        moments.norm_sum = float(arrays.pop("norm_sum"))
        vars(moments).update(arrays)
        return moments


QUANTILES = (0.01, 0.5, 0.99)
MASSIVE_TOKENS_KEPT = 16


@dataclass
class PartitionStats:
    """Everything one pass over a partition yields; saved per partition and reused while the
    partition's committed version is unchanged."""

    key: str
    version: str
    moments: ActivationMoments  # non-BOS tokens
    norms: np.ndarray  # [tokens] float32, every token (BOS included)
    positions: np.ndarray  # [tokens] int32
    strata: np.ndarray  # [tokens] int16
    sample: np.ndarray  # [m, d] float32 uniform sample of non-BOS tokens (approximate quantiles)
    massive: np.ndarray  # [MASSIVE_TOKENS_KEPT, 3] (row, dim, value) of the largest |activations|
    windows: np.ndarray  # [n_windows, 2] (doc_id, offset of position 1): window identity

    @classmethod
    def compute(cls, store, key: str, sample_size: int, seed: int = 0) -> PartitionStats:
        part = store.open(key)
        moments = ActivationMoments(part.manifest["d_model"])
        context_len = part.manifest["attrs"]["context_len"]
        non_bos = np.flatnonzero(np.arange(part.n_tokens) % context_len != 0)
        rng = np.random.default_rng([seed, int(key)])
        chosen = rng.choice(non_bos, min(sample_size, len(non_bos)), replace=False)
        columns: dict[str, list] = {
            name: [] for name in ("norms", "positions", "strata", "doc_ids", "doc_offsets", "sample", "massive")
        }
        for acts, info in store.iter_tokens([key], exclude_bos=False):
            bos = torch.from_numpy(info["positions"] == 0)
            norms = acts.norm(dim=1)
            moments.nonfinite += int((~torch.isfinite(norms[bos])).sum())
            moments.update(acts[~bos], norms[~bos])
            columns["norms"].append(norms.numpy())
            for name in ("positions", "strata", "doc_ids", "doc_offsets"):
                columns[name].append(info[name])
            columns["sample"].append(acts[torch.from_numpy(np.isin(info["row"], chosen))].numpy())
            peak, dim = acts.nan_to_num(0).abs().max(1)
            top = peak.topk(min(MASSIVE_TOKENS_KEPT, len(peak))).indices
            columns["massive"].append(np.stack([info["row"][top], dim[top].numpy(), acts[top, dim[top]].numpy()], 1))
        merged = {name: np.concatenate(values) for name, values in columns.items()}
        massive = merged["massive"][np.argsort(-np.abs(merged["massive"][:, 2]))[:MASSIVE_TOKENS_KEPT]]
        starts = merged["positions"] == 1
        windows = np.stack([merged["doc_ids"][starts], merged["doc_offsets"][starts]], 1)
        return cls(
            key,
            part.manifest["version"],
            moments,
            merged["norms"].astype(np.float32),
            merged["positions"],
            merged["strata"],
            merged["sample"],
            massive,
            windows,
        )

    def save(self, path: Path) -> None:
        self.moments.save(moments_path(path))
        # written last: its presence marks the cache entry complete
        save_arrays(path, {name: value for name, value in vars(self).items() if name != "moments"})

    @classmethod
    def load(cls, path: Path) -> PartitionStats:
        arrays = load_arrays(path)
        key, version = str(arrays.pop("key")), str(arrays.pop("version"))
        return cls(key, version, ActivationMoments.load(moments_path(path)), **arrays)


def moments_path(path: Path) -> Path:
    """Where a partition's moments sit beside its statistics file."""
    return path.with_suffix(".moments.npz")

"""One metric suite for every dictionary (k-means variants, leader clustering and SAEs alike).

FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated tokens, computed
here in float64 (SAELens' and SAEBench's "explained variance" once squared E[x^2]).
Usage: a feature is dead when it never fires on the evaluated tokens and dense when it fires
on more than DENSE_SHARE of them; usage entropy is that of the firing distribution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from gemma_assets.core import progress
from gemma_assets.core.bootstrap import WindowSums
from gemma_assets.core.codes import Codes, Dictionary
from gemma_assets.core.engine import Partitioned, Shard, map_reduce

DENSE_SHARE = 0.1
WINDOW_FIELDS = ("n", "sse", "sq", "x", "cosine", "relative_norm", "l0")


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained of x_hat [n, d] as a reconstruction of x [n, d]."""
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@dataclass
class ReconstructionMetrics:
    """Streaming accumulator; feed (x, x_hat, codes) batch by batch."""

    n_features: int
    n_tokens: int = 0
    sum_sq_error: float = 0.0
    sum_sq_norm: float = 0.0
    sum_x: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [d_model] once a batch is in
    sum_cosine: float = 0.0
    sum_relative_norm: float = 0.0
    sum_l0: float = 0.0
    d_model: int = 0
    encode_seconds: float = 0.0
    fires: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    windows: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # window id -> its sums

    def update(
        self, x: torch.Tensor, x_hat: torch.Tensor, codes: Codes | None, windows: np.ndarray | None = None
    ) -> None:
        """Add a batch; with `windows` (the window id of each token) the sums are also kept per
        window, for intervals by a bootstrap over windows. Without `codes` (x_hat is not a
        dictionary's reconstruction) L0 and usage stay 0."""
        x64, x_hat64 = x.double(), x_hat.double()
        if not self.d_model:
            self.sum_x, self.d_model = np.zeros(x.shape[1]), x.shape[1]
            self.fires = torch.zeros(self.n_features, dtype=torch.long)
        per_token = {
            "sse": ((x64 - x_hat64) ** 2).sum(1),
            "sq": (x64**2).sum(1),
            "cosine": torch.nn.functional.cosine_similarity(x64, x_hat64, dim=1),
            "relative_norm": x_hat64.norm(dim=1) / x64.norm(dim=1).clamp_min(1e-12),
            "l0": codes.l0().double() if codes is not None else torch.zeros(len(x), dtype=torch.float64),
        }
        self.n_tokens += len(x)
        self.sum_sq_error += float(per_token["sse"].sum())
        self.sum_sq_norm += float(per_token["sq"].sum())
        self.sum_x += x64.sum(0).numpy()
        self.sum_cosine += float(per_token["cosine"].sum())
        self.sum_relative_norm += float(per_token["relative_norm"].sum())
        self.sum_l0 += float(per_token["l0"].sum())
        if windows is not None:
            self._add_windows(windows, x64, per_token)
        # a feature that fires twice in one token (never, for these dictionaries) counts once per token
        if codes is not None:
            self.fires += torch.bincount(codes.indices[codes.active].cpu(), minlength=self.n_features)

    def _add_windows(self, windows: np.ndarray, x64: torch.Tensor, per_token: dict[str, torch.Tensor]) -> None:
        ids, inverse = np.unique(windows, return_inverse=True)
        index = torch.from_numpy(inverse)
        sums = {
            name: torch.zeros(len(ids), dtype=torch.float64).index_add_(0, index, v) for name, v in per_token.items()
        }
        sums["n"] = torch.bincount(index, minlength=len(ids)).double()
        sums["x"] = torch.zeros(len(ids), x64.shape[1], dtype=torch.float64).index_add_(0, index, x64)
        for row, window in enumerate(ids.tolist()):
            kept = self.windows.setdefault(window, {name: np.zeros(()) for name in sums})
            for name, values in sums.items():
                kept[name] = kept[name] + values[row].numpy()

    def merge(self, other: ReconstructionMetrics) -> None:
        """Fold in another accumulator's sums (another partition's: windows never span two)."""
        if not other.d_model:
            return
        if not self.d_model:
            self.sum_x, self.d_model = np.zeros(other.d_model), other.d_model
            self.fires = torch.zeros(self.n_features, dtype=torch.long)
        self.n_tokens += other.n_tokens
        self.sum_sq_error += other.sum_sq_error
        self.sum_sq_norm += other.sum_sq_norm
        self.sum_x += other.sum_x
        self.sum_cosine += other.sum_cosine
        self.sum_relative_norm += other.sum_relative_norm
        self.sum_l0 += other.sum_l0
        self.encode_seconds += other.encode_seconds
        self.fires += other.fires
        for window, sums in other.windows.items():
            kept = self.windows.setdefault(window, {name: np.zeros(()) for name in sums})
            for name, values in sums.items():
                kept[name] = kept[name] + values

    def window_sums(self) -> WindowSums:
        """The per-window sums, windows in increasing id order."""
        order = sorted(self.windows)
        return WindowSums.of(
            {name: np.stack([np.asarray(self.windows[w][name]) for w in order]) for name in WINDOW_FIELDS}
        )

    def result(self) -> dict[str, float]:
        if not self.n_tokens:
            raise ValueError("no tokens were evaluated: the held-out split is empty")
        total_variance = self.sum_sq_norm - float(self.sum_x @ self.sum_x) / self.n_tokens
        # tokens without spread (one token, or identical ones) leave FVU undefined, not infinite
        fvu = self.sum_sq_error / total_variance if total_variance > 0 else float("nan")
        share = self.fires.double() / self.fires.sum().clamp_min(1)
        entropy = float(-(share[share > 0] * share[share > 0].log2()).sum())
        return {
            "fvu": fvu,
            "mse": self.sum_sq_error / (self.n_tokens * self.d_model),
            "cosine": self.sum_cosine / self.n_tokens,
            "relative_norm": self.sum_relative_norm / self.n_tokens,
            "l0": self.sum_l0 / self.n_tokens,
            "dead_features": int((self.fires == 0).sum()),
            "dense_features": int((self.fires > DENSE_SHARE * self.n_tokens).sum()),
            "usage_entropy_bits": entropy,
            "usage_entropy_normalized": entropy / np.log2(self.n_features) if self.n_features > 1 else 1.0,
            "encode_tokens_per_s": self.n_tokens / self.encode_seconds if self.encode_seconds else float("inf"),
            "n_tokens": self.n_tokens,
        }


def paired_window_sums(x: torch.Tensor, x_hat: torch.Tensor, windows: np.ndarray) -> WindowSums:
    """Per-window sums of x_hat [n, d] read as a reconstruction of x [n, d] where x_hat is no
    dictionary's (another model's activations on the same tokens): FVU, cosine and relative norm
    come out as for a dictionary, L0 is 0."""
    metrics = ReconstructionMetrics(n_features=0)
    metrics.update(x, x_hat, None, windows)
    return metrics.window_sums()


def evaluate(batches: Iterable[torch.Tensor], dictionary: Dictionary, device: str = "cpu") -> dict[str, float]:
    """The metric suite of a dictionary over batches of raw activations (raw units throughout);
    encoding runs on `device`, and its time gives the encode throughput."""
    with progress.task("held-out evaluation of dictionary", None, "tokens") as evaluated:
        return _accumulate(((x, None) for x in batches), dictionary, device, evaluated.advance).result()


def evaluate_windows(
    batches: Iterable[tuple[torch.Tensor, np.ndarray]] | Partitioned,
    dictionary: Dictionary,
    device: str = "cpu",
    name: str = "dictionary",
    tokens: int | None = None,
) -> tuple[dict[str, float], WindowSums]:
    """`evaluate` over (activations, window id of each token) batches, with the per-window sums
    that intervals are computed from; progress reported as the held-out evaluation of `name`,
    against at most `tokens` tokens. Store partitions are evaluated one task each on their
    engine, their sums added in partition order."""
    with progress.task(f"held-out evaluation of {name}", tokens, "tokens", total_is_bound=True) as evaluated:
        if isinstance(batches, Partitioned):
            metrics = map_reduce(
                batches,
                _partition_metrics,
                _merged,
                dictionary,
                device,
                on_result=lambda m: evaluated.advance(m.n_tokens),
            )
        else:
            metrics = _accumulate(batches, dictionary, device, evaluated.advance)
    return metrics.result(), metrics.window_sums()


def _merged(total: ReconstructionMetrics, more: ReconstructionMetrics) -> ReconstructionMetrics:
    total.merge(more)
    return total


def _partition_metrics(shard: Shard, dictionary: Dictionary, device: str) -> ReconstructionMetrics:
    """One partition's metric sums (a task of `evaluate_windows`; a worker without CUDA encodes on its CPU)."""
    return _accumulate(shard.window_batches(), dictionary, device if torch.cuda.is_available() else "cpu")


def _accumulate(
    batches: Iterable[tuple[torch.Tensor, np.ndarray | None]],
    dictionary: Dictionary,
    device: str,
    on_tokens: Callable[[int], None] = lambda _: None,
) -> ReconstructionMetrics:
    metrics = ReconstructionMetrics(dictionary.n_features)
    for x, windows in batches:
        on_device = x.to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        codes = dictionary.encode(on_device)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        metrics.encode_seconds += time.perf_counter() - started
        metrics.update(x, dictionary.decode(codes).cpu(), codes.to("cpu"), windows)
        on_tokens(len(x))
    return metrics

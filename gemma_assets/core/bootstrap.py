"""Confidence intervals by a bootstrap over held-out windows, and paired comparisons.

Tokens of one window share their context, so they are not independent draws: the window is the
unit that is resampled, never the token. Every figure is a ratio of sums over tokens; keeping
those sums per window makes any resample a weighted sum (weights = how often each window was
drawn), so one matrix product gives every draw at once.

A paired comparison resamples the same windows for both dictionaries: the interval of the
difference then reflects how much the two differ on the same text, not how much the text varies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

DRAWS = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval (NaN bounds: no interval, as
    from a single window)."""

    value: float
    low: float
    high: float

    @property
    def bounded(self) -> bool:
        return bool(np.isfinite(self.low) and np.isfinite(self.high))

    def excludes(self, value: float = 0.0) -> bool:
        return self.bounded and not self.low <= value <= self.high

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, spec: str = ".4g") -> str:
        bounds = f"[{self.low:{spec}}, {self.high:{spec}}]" if self.bounded else "[no interval]"
        return f"{self.value:{spec}} {bounds}"

    def __str__(self) -> str:
        return self.format()


@functools.cache
def resample_weights(n_windows: int, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """[draws, n_windows] counts: how often each window is drawn in each resample (each row
    sums to n_windows). Read-only and cached: every interval of a report draws the same ones."""
    if n_windows < 2:
        raise ValueError(f"a bootstrap over windows needs at least 2 windows, got {n_windows}")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_windows, np.full(n_windows, 1 / n_windows), size=draws).astype(np.float64)
    weights.setflags(write=False)
    return weights


def interval(
    statistic: Callable[[np.ndarray], np.ndarray], n_windows: int, draws: int = DRAWS, seed: int = 0
) -> Interval:
    """`statistic(weights [k, W]) -> [k]` evaluated on all windows once (weights of ones) and on
    every resample; the interval is the central LEVEL share of the resampled values. One window
    has a value and no interval (NaN bounds: nothing to resample)."""
    point = float(statistic(np.ones((1, n_windows)))[0])
    if n_windows < 2:
        return Interval(point, float("nan"), float("nan"))
    values = statistic(resample_weights(n_windows, draws, seed))
    values = values[np.isfinite(values)]
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(values, [tail, 1 - tail]) if len(values) else (np.nan, np.nan)
    return Interval(point, float(low), float(high))


@dataclass(frozen=True)
class WindowSums:
    """Per held-out window, the sums every reconstruction metric is a ratio of.

    n: tokens; sse: sum ||x - x_hat||^2; sq: sum ||x||^2; x: sum of x [W, d]; cosine, relative_norm,
    l0: sums over the window's tokens. Windows are in the same order for every dictionary."""

    n: np.ndarray
    sse: np.ndarray
    sq: np.ndarray
    x: np.ndarray
    cosine: np.ndarray
    relative_norm: np.ndarray
    l0: np.ndarray

    @property
    def n_windows(self) -> int:
        return len(self.n)

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(vars(self))

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> WindowSums:
        return cls(**{name: np.asarray(arrays[name]) for name in cls.__dataclass_fields__})

    # each metric as a function of resample weights [k, W] -> [k]
    def fvu(self, w: np.ndarray) -> np.ndarray:
        n, sx = w @ self.n, w @ self.x
        return (w @ self.sse) / (w @ self.sq - (sx * sx).sum(1) / n)

    def mse(self, w: np.ndarray) -> np.ndarray:
        return (w @ self.sse) / ((w @ self.n) * self.x.shape[1])

    def mean_of(self, name: str) -> Callable[[np.ndarray], np.ndarray]:
        """A per-token mean (cosine, relative_norm, l0) as a statistic of the weights."""
        values = getattr(self, name)
        return lambda w: (w @ values) / (w @ self.n)


def _statistic(sums: WindowSums, metric: str) -> Callable[[np.ndarray], np.ndarray]:
    return getattr(sums, metric) if metric in ("fvu", "mse") else sums.mean_of(metric)


@dataclass(frozen=True)
class Comparison:
    """A minus B on the same windows, with the paired interval and what it allows one to say."""

    a: str
    b: str
    metric: str
    difference: Interval
    windows: int

    @property
    def resolved(self) -> bool:
        return self.difference.excludes(0.0)

    def windows_to_resolve(self) -> int | None:
        """Windows a paired interval of the same spread would need to exclude 0 (the half width
        shrinks as 1/sqrt(windows)); None when the difference is 0."""
        if self.resolved:
            return self.windows
        if self.difference.value == 0 or not np.isfinite(self.difference.half_width):
            return None
        return int(np.ceil(self.windows * (self.difference.half_width / abs(self.difference.value)) ** 2))


def paired(
    a: tuple[str, WindowSums], b: tuple[str, WindowSums], metric: str, draws: int = DRAWS, seed: int = 0
) -> Comparison:
    """Paired bootstrap of metric(A) - metric(B): both evaluated on the same resampled windows."""
    (name_a, sums_a), (name_b, sums_b) = a, b
    if not np.array_equal(sums_a.n, sums_b.n):
        raise ValueError(f"{name_a} and {name_b} were not evaluated on the same windows")
    stat_a, stat_b = _statistic(sums_a, metric), _statistic(sums_b, metric)
    difference = interval(lambda w: stat_a(w) - stat_b(w), sums_a.n_windows, draws, seed)
    return Comparison(name_a, name_b, metric, difference, sums_a.n_windows)


def share_interval(hits: np.ndarray, draws: int = DRAWS, seed: int = 0) -> Interval:
    """Interval of the share of True among independent units (e.g. clusters matched at F1 > 0.5),
    resampling the units themselves."""
    hits = np.asarray(hits, np.float64)
    return interval(lambda w: (w @ hits) / w.sum(1), len(hits), draws, seed)


def flatten(sums: Mapping[str, WindowSums]) -> dict[str, np.ndarray]:
    """Per-window sums of several dictionaries as one flat mapping ("<name>/<field>"), for an npz."""
    return {f"{name}/{field}": array for name, one in sums.items() for field, array in one.arrays().items()}


def unflatten(arrays: Mapping[str, np.ndarray]) -> dict[str, WindowSums]:
    names = sorted({key.rsplit("/", 1)[0] for key in arrays})
    fields = WindowSums.__dataclass_fields__
    return {name: WindowSums.of({field: arrays[f"{name}/{field}"] for field in fields}) for name in names}


@dataclass(frozen=True)
class Evidence:
    """Everything intervals are drawn from: per-window reconstruction sums of each dictionary
    and per-window summed CE of each spliced run (both over held-out windows)."""

    windows: Mapping[str, WindowSums]
    ce: Mapping[str, np.ndarray]  # run name (a dictionary, clean, zero-ablation, ...) -> [windows]
    predictions_per_window: int

    def metric(self, name: str, metric: str) -> Interval:
        return interval(_statistic(self.windows[name], metric), self.windows[name].n_windows)

    def compare(self, a: str, b: str, metric: str) -> Comparison:
        return paired((a, self.windows[a]), (b, self.windows[b]), metric)

    def _ce(self, name: str) -> Callable[[np.ndarray], np.ndarray]:
        losses = self.ce[name]
        return lambda w: (w @ losses) / (w.sum(1) * self.predictions_per_window)

    def delta_ce(self, name: str) -> Interval:
        """Paired: spliced CE minus clean CE on the same windows."""
        spliced, clean = self._ce(name), self._ce("clean")
        return interval(lambda w: spliced(w) - clean(w), len(self.ce[name]))

    def loss_recovered(self, name: str, ablation: str) -> Interval:
        spliced, clean, ablated = self._ce(name), self._ce("clean"), self._ce(ablation)
        return interval(lambda w: (ablated(w) - spliced(w)) / (ablated(w) - clean(w)), len(self.ce[name]))

    def compare_delta_ce(self, a: str, b: str) -> Comparison:
        ce_a, ce_b = self._ce(a), self._ce(b)
        difference = interval(lambda w: ce_a(w) - ce_b(w), len(self.ce[a]))
        return Comparison(a, b, "delta_ce", difference, len(self.ce[a]))


@dataclass(frozen=True)
class ClassCounts:
    """Per test window and class: tokens of the class [W, C] and how many a probe got right."""

    correct: np.ndarray
    total: np.ndarray

    @classmethod
    def of(cls, labels: np.ndarray, predictions: np.ndarray, windows: np.ndarray) -> ClassCounts:
        classes, label_index = np.unique(labels, return_inverse=True)
        ids, window_index = np.unique(windows, return_inverse=True)
        total = np.zeros((len(ids), len(classes)))
        correct = np.zeros((len(ids), len(classes)))
        np.add.at(total, (window_index, label_index), 1)
        np.add.at(correct, (window_index, label_index), predictions == labels)
        return cls(correct, total)

    def balanced_accuracy(self, w: np.ndarray) -> np.ndarray:
        """Mean recall over the classes present in each resample."""
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = (w @ self.correct) / (w @ self.total)
        return np.nanmean(recall, axis=1)


def probe_intervals(
    probe: ClassCounts, raw: ClassCounts, draws: int = DRAWS, seed: int = 0
) -> tuple[Interval, Interval]:
    """Balanced accuracy of a probe, and its ratio to the raw-activation probe's, both resampling
    the same test windows (paired)."""
    n = len(probe.total)
    accuracy = interval(probe.balanced_accuracy, n, draws, seed)
    retained = interval(lambda w: probe.balanced_accuracy(w) / raw.balanced_accuracy(w), n, draws, seed)
    return accuracy, retained

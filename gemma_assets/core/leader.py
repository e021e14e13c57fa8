"""Leader clustering on the centred unit sphere, as in Exemplar Partitioning (Rumbelow, arXiv 2605.14347).

Each token is centred by a fixed mean and L2-normalised. In stream order, a token whose
cosine distance to every exemplar so far exceeds the threshold becomes a new exemplar (opens
a region); any other token joins its nearest exemplar. The threshold is a percentile of the
within-batch pairwise cosine distances of the first batch, and streaming stops at the first
batch that opens no region (saturation). Exemplars are observed tokens and never move.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from gemma_assets.core import progress
from gemma_assets.core.codes import Codes, centred_units
from gemma_assets.core.config import ConfigError
from gemma_assets.core.dictionaries import GainShapeDictionary


def percentile_threshold(u: torch.Tensor, percentile: float) -> float:
    """The percentile (linear interpolation, as np.percentile) of pairwise cosine distances of unit rows u [n, d]."""
    n = len(u)
    upper = torch.ones(n, n, dtype=torch.bool, device=u.device).triu_(1)
    dist = (1 - u @ u.T)[upper]  # [n (n - 1) / 2]
    # kthvalue rather than torch.quantile, which refuses more than 2^24 values (n > ~5800)
    pos = percentile / 100 * (len(dist) - 1)
    below = int(pos)
    lo = torch.kthvalue(dist, below + 1).values
    hi = torch.kthvalue(dist, min(below + 2, len(dist))).values
    return float(lo + (pos - below) * (hi - lo))


def open_regions(u: torch.Tensor, exemplars: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of leader clustering, with the result of visiting its tokens one at a time.

    u [n, d]: unit directions in stream order; exemplars [r, d]. Returns (exemplars [r + m, d]
    with the m regions this batch opened appended, labels [n]: the nearest exemplar among those
    that existed when the token arrived; an opener's label is its own region).
    """
    n, r = len(u), len(exemplars)
    sims = u @ exemplars.T  # [n, r]
    best = sims.max(1).values if r else torch.full((n,), -torch.inf, device=u.device)
    # Only tokens far from every earlier exemplar can open a region; one of them opens a region
    # unless an opener earlier in this batch is within the threshold: a sequential pass over those few.
    candidates = (1 - best > threshold).nonzero().flatten()  # [c], ascending
    close = (1 - u[candidates] @ u[candidates].T <= threshold).cpu().numpy()  # [c, c]
    covered = np.zeros(len(candidates), dtype=bool)
    openers = []
    for i in range(len(candidates)):
        if not covered[i]:
            openers.append(i)
            covered |= close[i]
    opened = candidates[openers]  # [m] batch positions, ascending
    new = u[opened]  # [m, d]
    # A token may join a region opened earlier in its batch, never one opened after it
    later = opened[None, :] > torch.arange(n, device=u.device)[:, None]  # [n, m]
    new_sims = (u @ new.T).masked_fill_(later, -torch.inf)
    labels = torch.cat([sims, new_sims], 1).argmax(1)
    labels[opened] = torch.arange(r, r + len(opened), device=u.device)
    return torch.cat([exemplars, new]), labels


@dataclass(frozen=True)
class LeaderResult:
    exemplars: torch.Tensor  # [r, d] unit directions in centred space
    mean: torch.Tensor  # [d] subtracted before normalising
    threshold: float  # cosine distance
    counts: torch.Tensor  # [r] tokens that joined each region (or opened it) while streaming
    n_tokens_seen: int
    n_batches: int
    stopped_early: bool  # a batch opened no region (saturation) before the data ran out

    def dictionary(self) -> GainShapeDictionary:
        return leader_dictionary(self.exemplars, self.mean)


def leader_dictionary(exemplars: torch.Tensor, mean: torch.Tensor) -> GainShapeDictionary:
    """Leader regions read as a dictionary: a token's region is its nearest exemplar on the
    sphere (its Voronoi cell), and it keeps its own gain along that exemplar's direction."""
    return GainShapeDictionary(exemplars, mean, signed=False)


@dataclass(frozen=True)
class RegionMeanDictionary:
    """Leader regions read through their members: a token's region is its nearest exemplar on the
    sphere (as in `leader_dictionary`), and it is reconstructed as the mean of the train tokens
    of that region (L0 = 1, no free coefficient: k-means' own reading of a cluster)."""

    exemplars: torch.Tensor  # [r, d] unit directions in centred space
    mean: torch.Tensor  # [d]
    region_means: torch.Tensor  # [r, d] raw units

    @property
    def n_features(self) -> int:
        return len(self.exemplars)

    def directions(self) -> torch.Tensor:
        return self.exemplars

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) @ self.exemplars.T).argmax(1)

    def encode(self, x: torch.Tensor) -> Codes:
        return Codes.one_hot(self.regions(x), torch.ones(len(x)))

    def decode(self, codes: Codes) -> torch.Tensor:
        return self.region_means[codes.indices[:, 0]]


def region_means(batches: Iterable[torch.Tensor], exemplars: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Mean raw activation [r, d] of the tokens of each region (nearest exemplar on the sphere);
    a region no token falls in keeps the data mean."""
    sums = torch.zeros(exemplars.shape, dtype=torch.float64)
    counts = torch.zeros(len(exemplars), dtype=torch.float64)
    assign = RegionMeanDictionary(exemplars, mean, sums)
    for x in progress.tracked(batches, "region means", unit="batches"):
        regions = assign.regions(x)
        sums.index_add_(0, regions, x.double())
        counts += torch.bincount(regions, minlength=len(exemplars)).double()
    means = sums / counts.clamp_min(1)[:, None]
    means[counts == 0] = mean.double()
    return means.float()


def fit_leader(
    batches: Iterable[torch.Tensor], mean: torch.Tensor, percentile: float = 5.0, tokens: int | None = None
) -> LeaderResult:
    """Leader clustering of a stream of raw activation batches [n, d] until a batch opens no region.

    The first batch sets the threshold (O(n^2) memory in its size) and needs at least 2 tokens.
    Progress counts tokens against `tokens`, at most what the stream holds (it stops once saturated).
    """
    with progress.task("leader clustering", tokens, "tokens", total_is_bound=True) as streamed:
        return _fit_leader(batches, mean, percentile, streamed)


def _fit_leader(
    batches: Iterable[torch.Tensor], mean: torch.Tensor, percentile: float, streamed: progress.Task
) -> LeaderResult:
    if not 0 < percentile < 100:
        raise ConfigError(f"leader percentile must be in (0, 100), got {percentile}")
    exemplars, threshold = None, 0.0
    counts = torch.zeros(0, dtype=torch.long)
    n_tokens = n_batches = 0
    saturated = False
    for x in batches:
        if not len(x):  # e.g. a batch that held only BOS tokens
            continue
        u = centred_units(x, mean)
        if exemplars is None:
            if len(u) < 2:
                raise ConfigError("the first leader batch needs at least 2 tokens to set the threshold")
            threshold = percentile_threshold(u, percentile)
            if threshold <= 0:
                raise ConfigError(
                    f"percentile {percentile} of the first batch's cosine distances is 0 (duplicate "
                    "tokens): raise the percentile or the batch size"
                )
            exemplars = u[:0]
        n_before = len(exemplars)
        exemplars, labels = open_regions(u, exemplars, threshold)
        counts = torch.cat([counts, counts.new_zeros(len(exemplars) - n_before)])
        counts += torch.bincount(labels.cpu(), minlength=len(exemplars))
        n_tokens += len(u)
        n_batches += 1
        streamed.update(n_tokens, regions=len(exemplars))
        if len(exemplars) == n_before:
            saturated = True
            break
    if exemplars is None:
        raise ValueError("leader clustering got no tokens")
    return LeaderResult(exemplars, mean, threshold, counts, n_tokens, n_batches, saturated)

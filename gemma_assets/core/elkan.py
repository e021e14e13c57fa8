"""Elkan's (2003) bounds for exact Lloyd iterations on the CPU, as one compiled pass.

Each point keeps an upper bound on the distance to its centroid and a lower bound on the
distance to every centroid ([n, k] float32). After the centroids move, a distance is computed
only where the bounds cannot rule the centroid out. On real activations, where clusters
overlap and Hamerly's single lower bound rarely prunes a whole row, this skips ~96% of the
point-centroid distances after the first pass (demo activations, k = 256); the pruned
distances are scattered, so the pass is a compiled loop (numba) rather than a GEMM.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch


@numba.njit(fastmath=True, inline="always")
def _distance(x: np.ndarray, x_sq: float, c: np.ndarray, c_sq: float) -> float:
    # the same expansion as the GEMM path (||x||^2 - 2 x.c + ||c||^2), so both agree to rounding
    dot = np.float32(0.0)
    for t in range(x.shape[0]):
        dot += x[t] * c[t]
    squared = x_sq + c_sq - 2.0 * dot
    return math.sqrt(0.0 if squared < 0.0 else squared)  # rounding can leave a tiny negative


@numba.njit(parallel=True, fastmath=True, cache=True)
def _elkan_pass(x, x_sq, centroids, c_sq, half_gap, half_nearest, shift, near_tie, labels, upper, lower, tied):
    n, k = lower.shape
    computed = np.zeros(n, np.int64)
    for i in numba.prange(n):
        a = labels[i]
        row = lower[i]
        for j in range(k):  # a centroid that moved by s is at least (bound - s) away
            moved = row[j] - shift[j]
            row[j] = moved if moved > 0.0 else np.float32(0.0)
        u = upper[i] + shift[a]
        # a centroid is ruled out only when farther than u by the near-tie margin (in squared
        # distance, kmeans.near_ties): within it, float32's rounding could put either first
        reach = math.sqrt(u * u + near_tie * (3.0 * x_sq[i] + 2.0 * u * u))
        if reach <= half_nearest[a]:  # closer to its centroid than half the way to any other
            upper[i] = u
            continue
        tight = False
        count = 0
        for j in range(k):
            if j == a:
                continue
            bound = max(row[j], half_gap[a, j])
            if reach <= bound:
                continue
            if not tight:  # the upper bound may be loose: make it exact once, then test again
                u = _distance(x[i], x_sq[i], centroids[a], c_sq[a])
                row[a] = u
                reach = math.sqrt(u * u + near_tie * (3.0 * x_sq[i] + 2.0 * u * u))
                tight = True
                count += 1
                if reach <= bound:
                    continue
            d = _distance(x[i], x_sq[i], centroids[j], c_sq[j])
            row[j] = d
            count += 1
            if abs(d * d - u * u) <= near_tie * (3.0 * x_sq[i] + 2.0 * min(d, u) ** 2):
                tied[i] = True
            if d < u:
                a = j
                u = d
                reach = math.sqrt(u * u + near_tie * (3.0 * x_sq[i] + 2.0 * u * u))
        labels[i] = a
        upper[i] = u
        computed[i] = count
    return computed.sum()


def centroid_gaps(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half the distance between every pair of centroids [k, k] (0 on the diagonal) and half
    the distance from each centroid to its nearest other one [k]."""
    half_gap = torch.cdist(centroids, centroids) / 2
    half_gap.fill_diagonal_(float("inf"))
    half_nearest = half_gap.min(1).values
    return half_gap.fill_diagonal_(0.0), half_nearest


def elkan_pass(
    x: torch.Tensor,
    x_sq: torch.Tensor,
    centroids: torch.Tensor,
    c_sq: torch.Tensor,
    shift: torch.Tensor,
    gaps: tuple[torch.Tensor, torch.Tensor],
    near_tie: float,
    labels: torch.Tensor,
    upper: torch.Tensor,
    lower: torch.Tensor,
) -> tuple[int, torch.Tensor]:
    """Reassign the rows of x (float32, CPU; x_sq / c_sq the squared row norms of x /
    centroids) after the centroids moved by `shift`, updating labels [n], upper [n] and
    lower [n, k] in place. A centroid within the near-tie margin of a row's nearest (`near_tie`
    times 3 ||x||^2 + 2 d^2 in squared distance, kmeans.near_ties) is never ruled out by a bound.
    Returns how many distances it computed, and which rows had two computed distances within
    that margin (near ties, for the caller to settle)."""
    half_gap, half_nearest = gaps
    # read-only inputs as contiguous arrays; labels, upper and lower are updated in place
    x_, x_sq_, centroids_, c_sq_, half_gap_, half_nearest_, shift_ = (
        t.contiguous().numpy() for t in (x, x_sq, centroids, c_sq, half_gap, half_nearest, shift)
    )
    tied = np.zeros(len(x_), np.bool_)
    in_place = labels.numpy(), upper.numpy(), lower.numpy()
    computed = _elkan_pass(
        x_, x_sq_, centroids_, c_sq_, half_gap_, half_nearest_, shift_, np.float32(near_tie), *in_place, tied
    )
    return int(computed), torch.from_numpy(tied)

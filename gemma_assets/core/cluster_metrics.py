"""Cluster-quality metrics on held-out tokens: inertia, silhouettes, Davies-Bouldin, usage."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from gemma_assets.core import progress
from gemma_assets.core.kmeans import nearest_two

SILHOUETTE_SAMPLE = 10_000


def cluster_quality(batches: Iterable[torch.Tensor], centroids: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """One pass over batches (in the clustering's own space) against fixed centroids.

    - inertia: sum of squared distances to the nearest centroid;
    - simplified_silhouette: mean over all tokens of (b - a) / max(a, b), a = distance to own
      centroid, b = to the second nearest (the centroid-based silhouette);
    - silhouette_sampled: exact silhouette (scikit-learn) on a uniform sample of 10k tokens;
    - davies_bouldin: mean over clusters of max_j (S_i + S_j) / ||c_i - c_j||, S = mean distance
      of a cluster's tokens to its centroid (used clusters only);
    - NaN where a figure is undefined: silhouettes of one cluster, Davies-Bouldin of fewer than
      two used clusters or of two used clusters with the same centroid;
    - size_entropy: entropy of cluster usage / log k (1 = perfectly even);
    - dead_clusters (no held-out token), tiny_clusters (< 10% of the mean size).
    """
    from sklearn.metrics import silhouette_score

    k = len(centroids)
    c_sq = (centroids**2).sum(1)
    counts = torch.zeros(k, dtype=torch.float64)
    scatter = torch.zeros(k, dtype=torch.float64)
    inertia = silhouette_sum = 0.0
    n = 0
    generator = torch.Generator().manual_seed(seed)
    # the silhouette's uniform sample so far: rows, their random keys and their labels
    sample_x = torch.empty(0, centroids.shape[1], dtype=centroids.dtype)
    sample_keys, sample_labels = torch.empty(0), torch.empty(0, dtype=torch.long)
    for x in progress.tracked(batches, f"k={k} cluster quality on held-out tokens", unit="batches"):
        labels, first, second = nearest_two(x, centroids, c_sq)
        a, b = first.sqrt(), second.sqrt()
        inertia += float(first.double().sum())
        silhouette_sum += float(((b - a) / torch.maximum(a, b).clamp_min(1e-12)).double().sum())
        counts += torch.bincount(labels, minlength=k).double()
        scatter += torch.zeros(k, dtype=torch.float64).index_add_(0, labels, a.double())
        n += len(x)
        keys = torch.rand(len(x), generator=generator)  # bottom-k of random keys: a uniform sample
        candidates = torch.cat([sample_x, x])
        keys, labels = torch.cat([sample_keys, keys]), torch.cat([sample_labels, labels])
        keep = keys.argsort()[:SILHOUETTE_SAMPLE]
        sample_x, sample_keys, sample_labels = candidates[keep], keys[keep], labels[keep]
    used = counts > 0
    spread = scatter[used] / counts[used]
    centres = centroids[used].double()
    separation = torch.cdist(centres, centres).fill_diagonal_(float("inf"))
    davies_bouldin = (
        float(((spread[:, None] + spread[None, :]) / separation).max(1).values.mean())
        if used.sum() > 1 and bool((separation > 0).all())
        else float("nan")
    )
    p = (counts[used] / n).numpy()
    sampled_labels = sample_labels.numpy()
    sampled = (
        float(silhouette_score(sample_x.numpy(), sampled_labels))
        if 1 < len(np.unique(sampled_labels)) < len(sampled_labels)
        else float("nan")
    )
    return {
        "inertia": inertia,
        "mean_sq_distance": inertia / n,
        "simplified_silhouette": silhouette_sum / n,
        "silhouette_sampled": sampled,
        "davies_bouldin": davies_bouldin,
        "size_entropy": float(-(p * np.log(p)).sum() / math.log(k)) if k > 1 else 1.0,
        "dead_clusters": int((~used).sum()),
        "tiny_clusters": int((counts < 0.1 * n / k).sum() - (~used).sum()),
    }

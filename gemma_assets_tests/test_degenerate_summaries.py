"""Per-feature and per-cluster summaries survive degenerate features: one member, identical
values, values a few ULPs apart, magnitudes near float32's limit and zeros. Each returns finite,
well-formed output (NaN only where a figure is documented as undefined), never an exception:
one such feature used to stop the whole interpretation step (np.histogram cannot place 20
float32 edges in a range of a few ULPs)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_assets.core.cluster_metrics import cluster_quality
from gemma_assets.core.codes import Codes
from gemma_assets.core.feature_pages import feature_page, index_page
from gemma_assets.core.interpret import (
    EvalTokens,
    FeatureActivations,
    activation_f1,
    activation_histogram,
    example_features,
    partition_f1,
    summarise,
)
from gemma_assets.core.metrics import ReconstructionMetrics

FLOAT32_MAX = float(np.finfo(np.float32).max)
BASES = [0.0, 1.0, 3.0, -2.5, 1e-38, 1e-45, 1e30, -1e30, FLOAT32_MAX, -FLOAT32_MAX]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def activation_values(draw, size: int) -> np.ndarray:
    """float32 values of one feature: identical, a few ULPs apart, spread, zeros or huge."""
    base = np.float32(draw(st.sampled_from(BASES)))
    kind = draw(st.sampled_from(["identical", "ulps", "spread", "mixed"]))
    if kind == "identical":
        return np.full(size, base, np.float32)
    if kind == "ulps":
        steps = draw(st.lists(st.integers(0, 3), min_size=size, max_size=size))
        toward = np.float32(-np.inf if base > 0 else np.inf)  # away from float32's limit, never past it
        values = [base]
        for step in steps[1:]:
            values.append(values[-1] if step == 0 else np.nextafter(values[-1], toward))
        return np.array(values, np.float32)
    finite = st.floats(-FLOAT32_MAX, FLOAT32_MAX, allow_nan=False, allow_infinity=False, width=32)
    if kind == "spread":
        return np.array(draw(st.lists(finite, min_size=size, max_size=size)), np.float32)
    return np.array(draw(st.lists(st.sampled_from([0.0, *BASES]), min_size=size, max_size=size)), np.float32)


@st.composite
def features(draw):
    """FeatureActivations of 1..4 features (some dead) over a few tokens, and their EvalTokens."""
    n_features = draw(st.integers(1, 4))
    n_tokens = draw(st.integers(1, 12))
    d = 3
    token, feature, value = [], [], []
    for f in range(n_features):
        size = draw(st.integers(0, n_tokens))
        members = draw(st.permutations(range(n_tokens)))[:size]
        token += members
        feature += [f] * size
        value += list(draw(activation_values(size))) if size else []
    token, feature, value = np.array(token, np.int64), np.array(feature, np.int64), np.array(value, np.float32)
    order = np.lexsort((-value.astype(np.float64), feature))
    acts = FeatureActivations(token[order], feature[order], value[order], n_features, n_tokens)
    rows = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, -1.0]), min_size=n_tokens * d, max_size=n_tokens * d)))
    units = rows.reshape(n_tokens, d)
    units = units / units.norm(dim=1, keepdim=True).clamp_min(1e-12)  # unit rows, or zero for a zero row
    ids = np.array(draw(st.lists(st.integers(0, 3), min_size=n_tokens, max_size=n_tokens)))
    strata = np.array(draw(st.lists(st.integers(0, 1), min_size=n_tokens, max_size=n_tokens)))
    contexts = np.full((n_tokens, 3), -1)
    contexts[:, 1] = ids
    tokens = EvalTokens(units, ids, strata, ("a", "b"), contexts, np.arange(n_tokens))
    return acts, tokens, units


def _all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


@SETTINGS
@given(features())
def test_summarise_survives_degenerate_features(case):
    acts, tokens, units = case
    summaries = summarise(acts, tokens, units)
    assert [s["feature"] for s in summaries] == list(range(acts.n_features))
    for summary, count in zip(summaries, acts.counts(), strict=True):
        assert summary["count"] == count and _all_finite(summary), summary
        if not count:
            continue
        counts, edges = np.array(summary["histogram"]["counts"]), np.array(summary["histogram"]["edges"])
        assert len(counts) == 20 and len(edges) == 21 and counts.sum() == count
        assert np.all(np.diff(edges) > 0), edges
        assert summary["token_entropy_bits"] >= 0 and 0 < summary["stratum_purity"] <= 1
        assert -1 - 1e-5 <= summary["coherence"] <= 1 + 1e-5
        assert sum(len(b) for b in summary["quantile_examples"]) >= 1
        page = feature_page("f", summary, tokens, str, [], [], "none")
        assert "Activation histogram" in page and not re.search(r"\b(nan|inf)\b", page, re.IGNORECASE)
    assert index_page("index", summaries, ["none"] * len(summaries), str).startswith("<!doctype html>")
    assert all(_all_finite(example) for example in example_features(summaries, str))


@SETTINGS
@given(st.integers(1, 40).flatmap(activation_values), st.integers(1, 32))
def test_activation_histogram_places_every_value(values, bins):
    counts, edges = activation_histogram(values, bins)
    assert counts.sum() == len(values) and len(edges) == bins + 1
    assert np.all(np.isfinite(edges)) and np.all(np.diff(edges) > 0)
    assert edges[0] <= values.min() and values.max() <= edges[-1]


def test_numpy_alone_cannot_bin_a_few_ulps():
    """The failure the rehearsal met, kept so the test above keeps meaning something."""
    values = np.array([3.0, np.nextafter(np.float32(3), np.float32(4))], np.float32)
    with pytest.raises(ValueError, match="Too many bins"):
        np.histogram(values, bins=20)
    counts, _ = activation_histogram(values, 20)
    assert counts.sum() == 2


@st.composite
def clusterings(draw):
    """Tokens and centroids with one member per cluster, identical points, coincident centroids."""
    n, k, d = draw(st.integers(1, 10)), draw(st.integers(1, 5)), 2
    # residual norms reach 1e4 at most; 1e15 still squares within float32's range
    grid = st.sampled_from([0.0, 1.0, -1.0, 1e-30, 1e15])
    x = torch.tensor(draw(st.lists(grid, min_size=n * d, max_size=n * d)), dtype=torch.float32).reshape(n, d)
    centroids = torch.tensor(draw(st.lists(grid, min_size=k * d, max_size=k * d)), dtype=torch.float32).reshape(k, d)
    return x, centroids


@SETTINGS
@given(clusterings())
def test_cluster_quality_survives_degenerate_clusterings(case):
    x, centroids = case
    quality = cluster_quality([x], centroids)
    # NaN where a figure is undefined, as cluster_quality documents: a silhouette needs two clusters
    undefined = {"davies_bouldin", "silhouette_sampled"} | ({"simplified_silhouette"} if len(centroids) == 1 else set())
    for name, value in quality.items():
        assert math.isfinite(value) or (name in undefined and math.isnan(value)), (name, value)
    assert quality["dead_clusters"] + quality["tiny_clusters"] <= len(centroids)


@SETTINGS
@given(clusterings())
def test_usage_and_agreement_survive_degenerate_codes(case):
    x, centroids = case
    labels = torch.cdist(x.double(), centroids.double()).argmin(1)
    codes = Codes(labels[:, None], torch.ones(len(x), 1), torch.ones(len(x), 1, dtype=torch.bool))
    accumulated = ReconstructionMetrics(len(centroids))
    accumulated.update(x, centroids[labels], codes)
    result = accumulated.result()
    del result["encode_tokens_per_s"]  # infinite by design when no encode was timed, as here
    for name, value in result.items():
        assert math.isfinite(value) or (name == "fvu" and math.isnan(value)), (name, value)  # no variance: undefined
    k = len(centroids)
    acts = FeatureActivations.from_codes([codes], k)
    best, latent = activation_f1(labels.numpy(), k, acts)
    assert np.all((0 <= best) & (best <= 1)) and np.all(latent < k)
    agreement = partition_f1(labels.numpy(), labels.numpy(), k, k)
    assert np.all((0 <= agreement) & (agreement <= 1))

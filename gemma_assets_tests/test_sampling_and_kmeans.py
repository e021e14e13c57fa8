"""Sampling determinism and stratification; k-means against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from gemma_assets.core import model
from gemma_assets.core.corpus import iter_documents
from gemma_assets.core.kmeans import assign, fit_kmeans
from gemma_assets.core.sampling import sample_windows


def test_sample_is_deterministic_bos_first_and_covers_strata(tiny_run):
    layout, spec = tiny_run.layout, tiny_run.profile.sampling
    tokenizer = model.load_tokenizer(str(layout.models_dir / "tiny-gemma2"))
    files = sorted(str(p) for p in (layout.corpus_dir / "train").glob("*.jsonl.zst"))
    first, census = sample_windows(iter_documents(files), tokenizer, spec)
    second, _ = sample_windows(iter_documents(files), tokenizer, spec)
    assert np.array_equal(first.tokens, second.tokens) and np.array_equal(first.doc_ids, second.doc_ids)
    assert (first.tokens[:, 0] == tokenizer.bos_token_id).all()
    assert not (first.tokens[:, 1:] == tokenizer.bos_token_id).any()  # no mid-window BOS
    assert len(census) >= 3 and sum(row["window_share"] for row in census.values()) == pytest.approx(1)
    for row in census.values():  # the same rate for every stratum keeps the source mix
        assert abs(row["sampled_text_share"] - row["corpus_text_share"]) < 0.25
    # windows of one document never overlap and follow the document's own token order
    text = {d.doc_id: d.text for d in iter_documents(files)}
    row = 5
    ids = tokenizer(text[int(first.doc_ids[row])], add_special_tokens=False)["input_ids"]
    start = int(first.starts[row])
    assert ids[start : start + spec.context_len - 1] == first.tokens[row, 1:].tolist()


def test_kmeans_matches_sklearn_from_same_init():
    x, _ = make_blobs(n_samples=3000, n_features=16, centers=20, cluster_std=3.0, random_state=0)
    x = torch.from_numpy(x).float()
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:20]].clone()
    ours = fit_kmeans(x, 20, max_iter=10, tol=0.0, init=init)
    ref = KMeans(20, init=init.numpy(), n_init=1, max_iter=10, tol=0.0, algorithm="lloyd").fit(x.numpy())
    assert abs(ours.inertia_curve[-1] - ref.inertia_) / ref.inertia_ <= 1e-3
    labels, _ = assign(x, ours.centroids)
    assert adjusted_rand_score(ref.predict(x.numpy()), labels.numpy()) >= 0.99


@pytest.mark.parametrize("seeding", ["k-means||", "k-means++"])
def test_kmeans_recovers_blobs(seeding):
    x, truth = make_blobs(n_samples=4000, n_features=32, centers=8, cluster_std=1.0, random_state=3)
    result = fit_kmeans(torch.from_numpy(x).float(), 8, seed=0, seeding=seeding)
    labels, _ = assign(torch.from_numpy(x).float(), result.centroids)
    assert adjusted_rand_score(truth, labels.numpy()) >= 0.99
    assert result.converged and result.inertia_curve == sorted(result.inertia_curve, reverse=True)


def test_kmeans_parallel_seeds_as_well_as_kmeans_plusplus_and_is_reproducible():
    """k-means|| picks candidates in a few GEMM passes; greedy k-means++ over them (weighted by
    the rows each stands for) should cost about what k-means++ on all rows costs."""
    x, _ = make_blobs(n_samples=6000, n_features=24, centers=40, cluster_std=4.0, random_state=5)
    x = torch.from_numpy(x).float()

    def seeding_cost(seeding: str, seed: int) -> float:
        return fit_kmeans(x, 40, max_iter=0, seed=seed, seeding=seeding).inertia_curve[0]

    parallel = [seeding_cost("k-means||", seed) for seed in range(4)]
    greedy = [seeding_cost("k-means++", seed) for seed in range(4)]
    assert sum(parallel) <= 1.1 * sum(greedy)
    assert seeding_cost("k-means||", 0) == parallel[0]


def test_random_seeding_draws_distinct_rows_reproducibly():
    x = torch.randn(500, 8)
    from gemma_assets.core.kmeans import random_rows

    first = random_rows(x, 64, torch.Generator().manual_seed(3))
    again = random_rows(x, 64, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    rows = {tuple(row.tolist()) for row in first}
    assert len(rows) == 64 and rows <= {tuple(row.tolist()) for row in x}

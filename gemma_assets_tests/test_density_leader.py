"""Streamed diagonal GMM (EM) against scikit-learn; leader clustering against a sequential reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from gemma_assets.core.codes import centred_units as directions
from gemma_assets.core.gmm import fit_gmm, lowest_density
from gemma_assets.core.kmeans import fit_kmeans
from gemma_assets.core.leader import fit_leader, open_regions
from gemma_assets.core.metrics import evaluate


def batched(x: torch.Tensor, size: int):
    return lambda: (x[start : start + size] for start in range(0, len(x), size))


def three_component_mixture(n: int = 3000, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0, 0, 0], [6, 6, 0, 0], [0, -6, 6, 0]])
    stds = np.array([[1.0, 0.7, 1.4, 1.0], [0.5, 1.0, 1.0, 2.0], [1.2, 1.2, 0.6, 0.8]])
    labels = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    x = means[labels] + stds[labels] * rng.standard_normal((n, 4))
    return torch.from_numpy(x).float(), labels, means


def overlapping_blobs() -> torch.Tensor:
    x, _ = make_blobs(n_samples=1500, n_features=5, centers=4, cluster_std=2.5, random_state=1)
    return torch.from_numpy(x).float()


def test_gmm_recovers_a_diagonal_mixture():
    x, labels, true_means = three_component_mixture()
    gmm = fit_gmm(batched(x, 500), fit_kmeans(x, 3, seed=0).centroids, tol=1e-8)
    assert gmm.converged
    match = torch.cdist(torch.from_numpy(true_means), gmm.means).argmin(1)  # fitted component of each true one
    assert sorted(match.tolist()) == [0, 1, 2]
    assert torch.allclose(gmm.means[match], torch.from_numpy(true_means), atol=0.15)
    assert torch.allclose(gmm.weights[match], torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.03)
    assert adjusted_rand_score(labels, gmm.predict(x).numpy()) >= 0.95


def test_gmm_log_likelihood_never_decreases():
    x = overlapping_blobs()
    gmm = fit_gmm(batched(x, 400), fit_kmeans(x, 6, seed=0).centroids, max_iter=40, tol=0)
    curve = gmm.log_likelihood_curve
    assert len(curve) == gmm.n_iter + 1 > 10
    assert (np.diff(curve) >= -1e-9 * np.abs(curve[:-1])).all()
    assert curve[-1] == pytest.approx(float(gmm.log_likelihood(x).mean()), rel=1e-12)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_gmm_matches_sklearn_from_the_same_start():
    x = overlapping_blobs()
    start = x[:4]  # a poor start (4 data rows), so the 8 EM steps move a long way
    init = fit_gmm(batched(x, 1500), start, max_iter=0, relative_var_floor=1e-12)
    ours = fit_gmm(batched(x, 1500), start, max_iter=8, tol=0, relative_var_floor=1e-12)
    assert ours.n_iter == 8 and (ours.means - init.means).abs().max() > 1
    sk = SkGaussianMixture(
        4,
        covariance_type="diag",
        weights_init=init.weights.numpy(),
        means_init=init.means.numpy(),
        precisions_init=1 / init.variances.numpy(),
        reg_covar=1e-12,
        max_iter=8,
        tol=0,
        init_params="random_from_data",
    ).fit(x.double().numpy())
    assert np.allclose(sk.means_, ours.means.numpy(), atol=1e-8)
    assert np.allclose(sk.covariances_, ours.variances.numpy(), rtol=1e-8)
    assert np.allclose(sk.score_samples(x.double().numpy()), ours.log_likelihood(x).numpy(), atol=1e-8)


def test_gmm_streamed_equals_one_batch():
    x = overlapping_blobs()
    init = fit_kmeans(x, 4, seed=0).centroids
    streamed = fit_gmm(batched(x, 100), init, max_iter=10, tol=0)
    whole = fit_gmm(batched(x, len(x)), init, max_iter=10, tol=0)
    assert streamed.n_iter == whole.n_iter
    assert np.allclose(streamed.log_likelihood_curve, whole.log_likelihood_curve, rtol=1e-12)
    for a, b in (
        (streamed.weights, whole.weights),
        (streamed.means, whole.means),
        (streamed.variances, whole.variances),
    ):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_gmm_empty_component_gets_zero_weight_and_stays_valid():
    x, _, _ = three_component_mixture(n=600)
    init = torch.cat([fit_kmeans(x, 3, seed=0).centroids, torch.full((1, 4), 1e4)])  # nobody's nearest
    gmm = fit_gmm(batched(x, 200), init, max_iter=5)
    assert gmm.weights[3] == 0 and torch.isfinite(gmm.variances).all() and (gmm.variances > 0).all()
    assert torch.isfinite(gmm.log_likelihood(x)).all() and not (gmm.predict(x) == 3).any()
    constant = fit_gmm(batched(torch.ones(10, 3), 10), torch.ones(2, 3), max_iter=3)
    assert np.isfinite(constant.log_likelihood_curve).all() and torch.isfinite(constant.weights).all()


def test_lowest_density_finds_a_planted_outlier():
    x, _, _ = three_component_mixture(n=1000)
    x[637] = torch.tensor([30.0, -30.0, 30.0, 30.0])
    gmm = fit_gmm(batched(x, 250), fit_kmeans(x, 3, seed=0).centroids, max_iter=20)
    info = {
        "partition": np.full(len(x), 7, np.int32),
        "row": np.arange(len(x)),
        "positions": np.arange(len(x)) % 64,
        "token_ids": np.arange(len(x)) + 1000,
    }
    batches = [
        (x[s : s + 300], {name: values[s : s + 300] for name, values in info.items()}) for s in range(0, len(x), 300)
    ]
    lowest = lowest_density(gmm, batches, 3)
    assert lowest[0] == {
        "log_likelihood": pytest.approx(float(gmm.log_likelihood(x[637:638]))),
        "partition": 7,
        "row": 637,
        "position": 637 % 64,
        "token_id": 1637,
    }
    assert len(lowest) == 3 and lowest[0]["log_likelihood"] < lowest[1]["log_likelihood"] <= lowest[2]["log_likelihood"]


def test_gmm_bad_config_raises():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="k >= 1"):
        fit_gmm(batched(x, 5), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="k=6 exceeds the 5 training tokens"):
        fit_gmm(batched(x, 5), torch.randn(6, 3))
    with pytest.raises(ValueError, match="relative_var_floor must be > 0"):
        fit_gmm(batched(x, 5), x[:2], relative_var_floor=0)
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        fit_gmm(batched(x, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="n >= 1"):
        lowest_density(fit_gmm(batched(x, 5), x[:2], max_iter=1), [], 0)


def directional_clusters(k: int = 12, per_batch: int = 20, n_batches: int = 5, seed: int = 0):
    """k orthogonal directions around an offset mean; each batch holds exactly per_batch tokens of each."""
    gen = torch.Generator().manual_seed(seed)
    d = 16
    axes = torch.linalg.qr(torch.randn(d, k, generator=gen))[0].T  # [k, d] orthonormal
    mean = 5 * torch.randn(d, generator=gen)
    labels = torch.cat([torch.randperm(k * per_batch, generator=gen) % k for _ in range(n_batches)])
    gain = 1 + 2 * torch.rand(len(labels), 1, generator=gen)
    x = mean + gain * axes[labels] + 0.02 * torch.randn(len(labels), d, generator=gen)
    return x, labels, mean


def test_leader_opens_one_region_per_cluster_and_saturates():
    k, per_batch = 12, 20
    x, labels, mean = directional_clusters(k, per_batch)
    size = k * per_batch
    # place the percentile between the largest within-cluster and smallest between-cluster distance
    within, pairs = k * per_batch * (per_batch - 1) / 2, size * (size - 1) / 2
    percentile = 100 * (within - 0.5) / (pairs - 1)
    result = fit_leader(batched(x, size)(), mean, percentile)
    assert len(result.exemplars) == k
    assert result.stopped_early and result.n_batches == 2 and result.n_tokens_seen == 2 * size
    assert result.counts.sum() == 2 * size and (result.counts == 2 * per_batch).all()
    u = directions(x[:size], mean)
    dist = 1 - u @ u.T
    same = labels[:size, None] == labels[None, :size]
    assert dist[same].max() < result.threshold < dist[~same].min()
    assert adjusted_rand_score(labels.numpy(), result.dictionary().encode(x).indices[:, 0].numpy()) >= 0.95
    assert torch.allclose(result.exemplars.norm(dim=1), torch.ones(k))


def test_leader_threshold_follows_the_percentile():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1)) + 3
    mean = x.mean(0)
    u = (x - mean).double().numpy()
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    pair_dist = (1 - u @ u.T)[np.triu_indices(len(u), 1)]
    thresholds = []
    for percentile in (1, 2.5, 10):
        result = fit_leader([x], mean, percentile)
        assert result.threshold == pytest.approx(np.percentile(pair_dist, percentile), abs=1e-6)
        assert not result.stopped_early and result.n_batches == 1  # the data ran out first
        thresholds.append(result.threshold)
    assert thresholds == sorted(thresholds)


def sequential_leader(u: np.ndarray, threshold: float) -> tuple[list[int], list[int]]:
    """Reference: visit tokens one by one; (indices of the exemplar tokens, label of each token)."""
    exemplars: list[int] = []
    labels: list[int] = []
    for i, token in enumerate(u):
        dist = [1 - float(u[e] @ token) for e in exemplars]
        if not exemplars or min(dist) > threshold:
            exemplars.append(i)
            labels.append(len(exemplars) - 1)
        else:
            labels.append(int(np.argmin(dist)))
    return exemplars, labels


def test_batched_leader_equals_sequential_reference():
    x = torch.randn(120, 6, generator=torch.Generator().manual_seed(2))
    mean = torch.zeros(6)
    result = fit_leader(batched(x, 40)(), mean, percentile=10)
    assert result.n_tokens_seen == 120
    u = directions(x, mean)
    exemplar_rows, ref_labels = sequential_leader(u.double().numpy(), result.threshold)
    assert torch.equal(result.exemplars, u[exemplar_rows])
    assert result.counts.tolist() == np.bincount(ref_labels, minlength=len(exemplar_rows)).tolist()
    exemplars, labels = u[:0], []
    for start in range(0, 120, 40):
        exemplars, batch_labels = open_regions(u[start : start + 40], exemplars, result.threshold)
        labels += batch_labels.tolist()
    assert labels == ref_labels


def test_leader_reconstruction_explains_clustered_variance():
    x, _, mean = directional_clusters()
    result = fit_leader(batched(x, 240)(), mean, percentile=5)
    held_out = batched(x[480:], 200)()
    dictionary = result.dictionary()
    metrics = evaluate(held_out, dictionary)
    assert metrics["fvu"] < 0.05 and metrics["l0"] == 1
    assert dictionary.decode(dictionary.encode(x[:5])).shape == (5, 16)


def test_leader_bad_config_raises():
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\)"):
        fit_leader([torch.randn(10, 4)], torch.zeros(4), percentile=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        fit_leader([torch.randn(1, 4)], torch.zeros(4))
    with pytest.raises(ValueError, match="duplicate"):
        fit_leader([torch.ones(10, 4)], torch.zeros(4))
    with pytest.raises(ValueError, match="no tokens"):
        fit_leader([torch.zeros(0, 4)], torch.zeros(4))


def test_member_mean_reading_equals_a_direct_numpy_computation():
    """Each region is read as the mean of its train tokens: the region of a token is its nearest
    exemplar by cosine of centred vectors, computed here with plain numpy loops."""
    from gemma_assets.core.leader import RegionMeanDictionary, region_means

    rng = np.random.default_rng(5)
    train = rng.normal(size=(500, 6)) + rng.choice([-4, 0, 4], size=(500, 1))
    heldout = rng.normal(size=(80, 6)) * 2
    mean = train.mean(0)
    exemplars = train[[0, 7, 99, 250]] - mean
    exemplars /= np.linalg.norm(exemplars, axis=1, keepdims=True)
    exemplars = np.vstack([exemplars, -np.ones((1, 6)) / np.sqrt(6)])  # a region no train token may fall in

    def region(x: np.ndarray) -> int:
        centred = (x - mean) / np.linalg.norm(x - mean)
        return int(np.argmax([centred @ e for e in exemplars]))

    expected = np.tile(mean, (len(exemplars), 1))
    for r in range(len(exemplars)):
        members = [x for x in train if region(x) == r]
        if members:
            expected[r] = np.mean(members, axis=0)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    means = region_means([t(train[:200]), t(train[200:])], t(exemplars), t(mean))
    np.testing.assert_allclose(means.numpy(), expected, rtol=1e-4, atol=1e-4)
    reading = RegionMeanDictionary(t(exemplars), t(mean), means)
    x_hat = reading.decode(reading.encode(t(heldout))).numpy()
    np.testing.assert_allclose(x_hat, np.stack([expected[region(x)] for x in heldout]), rtol=1e-4, atol=1e-4)
    assert evaluate([t(heldout)], reading)["l0"] == 1.0

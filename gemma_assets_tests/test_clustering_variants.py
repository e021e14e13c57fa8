"""K-means backends and streaming, the clustering dictionaries and the cluster-quality metrics."""

from __future__ import annotations

import shutil

import dagster as dg
import pytest
import torch
from sklearn.datasets import make_blobs

from gemma_assets.core.cluster_metrics import cluster_quality
from gemma_assets.core.codes import unit_rows
from gemma_assets.core.config import ConfigError, load_run_config
from gemma_assets.core.dictionaries import MatchingPursuitDictionary, fit_gain_shape
from gemma_assets.core.kmeans import fit_kmeans
from gemma_assets.core.metrics import evaluate
from gemma_assets.defs.graph import build_definitions


def _blobs(n=3000, d=16, k=6, seed=0):
    x, truth = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=0.5, random_state=seed)
    return torch.from_numpy(x).float(), truth


ELKAN, HAMERLY = 2048, 0  # bounds_mb: room for Elkan's [n, k] bounds, or none (Hamerly's)


@pytest.mark.parametrize("streamed_bounds_mb", [ELKAN, HAMERLY], ids=["elkan", "hamerly"])
def test_streamed_fit_equals_in_memory_fit(streamed_bounds_mb):
    x, _ = _blobs()
    init = x[:6].clone()
    in_memory = fit_kmeans(x, 6, max_iter=15, tol=0.0, init=init)
    streamed = fit_kmeans(
        lambda: (x[i : i + 250] for i in range(0, len(x), 250)),
        6,
        max_iter=15,
        tol=0.0,
        init=init,
        bounds_mb=streamed_bounds_mb,
    )
    assert torch.allclose(in_memory.centroids, streamed.centroids, atol=1e-4)  # float32 batch sums round differently
    assert in_memory.inertia_curve == pytest.approx(streamed.inertia_curve, rel=1e-5)
    assert torch.equal(in_memory.sizes, streamed.sizes)


def _plain_lloyd(x: torch.Tensor, init: torch.Tensor, iterations: int) -> tuple[torch.Tensor, list[float]]:
    """Textbook Lloyd in float64, every distance computed: the reference for the bounded fits."""
    x, centroids, curve = x.double(), init.double(), []
    for _ in range(iterations + 1):
        labels = torch.cdist(x, centroids).argmin(1)
        curve.append(float(((x - centroids[labels]) ** 2).sum()))
        centroids = torch.stack([x[labels == j].mean(0) for j in range(len(centroids))])
    return labels, curve


@pytest.mark.parametrize("bounds_mb", [ELKAN, HAMERLY], ids=["elkan", "hamerly"])
def test_bounds_skip_work_but_not_exactness(bounds_mb):
    x, _ = _blobs(n=4000, k=10)
    init = x[:10].clone()
    result = fit_kmeans(x, 10, max_iter=30, tol=0.0, init=init, bounds_mb=bounds_mb)
    assert result.distances_computed < 0.5 * len(x) * 10 * (result.n_iter + 1)
    # inertia from the running sums equals the directly computed one
    labels = torch.cdist(x, result.centroids).argmin(1)
    direct = float(((x - result.centroids[labels]) ** 2).sum())
    assert result.inertia_curve[-1] == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("bounds_mb", [ELKAN, HAMERLY], ids=["elkan", "hamerly"])
def test_bounded_lloyd_equals_plain_lloyd_on_overlapping_clusters(bounds_mb):
    """Overlapping clusters (as real activations are) keep many assignments in play every
    iteration, the regime where a wrong bound would show."""
    generator = torch.Generator().manual_seed(3)
    x = (
        torch.randn(6000, 24, generator=generator)
        + 0.6 * torch.randn(12, 24, generator=generator)[torch.randint(12, (6000,), generator=generator)]
    )
    init = x[:12].clone()
    result = fit_kmeans(x, 12, max_iter=15, tol=0.0, init=init, bounds_mb=bounds_mb)
    labels, curve = _plain_lloyd(x, init, 15)
    assert result.inertia_curve == pytest.approx(curve, rel=1e-5)
    assert torch.equal(result.sizes, torch.bincount(labels, minlength=12))


def test_minibatch_backend_honours_the_contract():
    x, _ = _blobs()
    full = fit_kmeans(x, 6, seed=0)
    mini = fit_kmeans(x, 6, seed=0, backend="minibatch", minibatch_steps=50)
    assert mini.centroids.shape == full.centroids.shape and mini.sizes.sum() == len(x)
    assert mini.inertia_curve[-1] <= 1.05 * full.inertia_curve[-1]


def test_bad_backend_config_fails_clearly():
    x, _ = _blobs(n=100)
    with pytest.raises(ConfigError, match="unknown k-means backend 'faiss'; valid: torch, minibatch, cuml"):
        fit_kmeans(x, 4, backend="faiss")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU and none is visible"):
            fit_kmeans(x, 4, backend="cuml")


def test_gain_shape_reconstructs_tokens_on_rays():
    generator = torch.Generator().manual_seed(0)
    directions = unit_rows(torch.randn(5, 32, generator=generator))
    scale = torch.rand(2000, 1, generator=generator) * 10 + 1
    mean = torch.full((32,), 3.0)
    x = mean + scale * directions[torch.randint(5, (2000,), generator=generator)]
    dictionary, _ = fit_gain_shape(x, mean, 5, seed=0)
    result = evaluate([x], dictionary)
    assert result["fvu"] < 1e-6 and result["l0"] == 1


def test_matching_pursuit_uses_m_atoms():
    atoms = torch.eye(8)[:6]
    mean = torch.zeros(8)
    x = 3 * atoms[1] - 2 * atoms[4] + 0.1 * atoms[0]
    for m, expected in ((2, 3 * atoms[1] - 2 * atoms[4]), (3, x)):
        dictionary = MatchingPursuitDictionary(atoms, mean, m)
        codes = dictionary.encode(x[None])
        assert torch.allclose(dictionary.decode(codes)[0], expected) and codes.l0().item() == m


def test_cluster_quality_on_separated_blobs():
    x, _ = _blobs(n=3000, k=6)
    result = fit_kmeans(x, 6, seed=0)
    quality = cluster_quality([x[:1500], x[1500:]], result.centroids)
    assert quality["simplified_silhouette"] > 0.8 and quality["silhouette_sampled"] > 0.8
    assert quality["davies_bouldin"] < 0.3 and quality["size_entropy"] > 0.95
    assert quality["dead_clusters"] == 0 and quality["inertia"] == pytest.approx(result.inertia_curve[-1], rel=1e-4)
    far = torch.cat([result.centroids, torch.full((1, 16), 1e4)])
    assert cluster_quality([x], far)["dead_clusters"] == 1


def test_cluster_models_asset_streams_when_over_budget(tiny_run, tmp_path):
    """The asset's out-of-core branch (a run-config budget of 0 MB) gives the in-memory result."""
    data_root = tmp_path / "data"
    shutil.copytree(tiny_run.data_root, data_root)
    over_budget = load_run_config("tiny", ["clustering.in_memory_mb=0"])
    defs = build_definitions(over_budget, data_root=str(data_root))
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("fit_cluster_models").execute_in_process(
            instance=instance, partition_key="64", asset_selection=[dg.AssetKey("cluster_models")]
        )
    assert result.success
    in_memory = tiny_run.layout.kmeans_records(64)[0].row()
    streamed = defs.resources["storage"].layout().kmeans_records(64)[0].row()
    assert not in_memory["train_streamed"] and streamed["train_streamed"]
    assert streamed["iterations"] == in_memory["iterations"]
    for name in ("heldout_fvu", "train_inertia", "heldout_simplified_silhouette"):
        assert streamed[name] == pytest.approx(in_memory[name], rel=1e-4), name


@pytest.mark.parametrize("bounds_mb", [ELKAN, HAMERLY], ids=["elkan", "hamerly"])
def test_empty_cluster_is_reseeded_at_the_farthest_token(bounds_mb):
    x, _ = _blobs(n=2000, k=5)
    init = torch.cat([x[:4], x[:1]])  # the duplicate centroid wins no token: cluster 4 starts empty
    result = fit_kmeans(x, 5, max_iter=20, tol=0.0, init=init, bounds_mb=bounds_mb)
    assert (result.sizes > 0).all()
    curve = result.inertia_curve
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(curve, curve[1:], strict=False))
    labels, _ = _plain_lloyd(x, result.centroids, 0)
    assert torch.equal(result.sizes, torch.bincount(labels, minlength=5))  # the bounds ended on the true assignment


def _tied_rows(n: int = 3000, d: int = 256, k: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (bf16-exact, as stored) nearer centroid 0 or 1 by 4 * 2^-20 in squared distance, out of
    norms of thousands: the two differ only in dimension 0 (+1 and -1), where a row holds
    +-2^-20. float32 cannot tell the two distances apart; exact arithmetic can."""
    generator = torch.Generator().manual_seed(7)
    centroids = (torch.randn(k, d, generator=generator) * 4).bfloat16().float()
    centroids[1] = centroids[0]
    centroids[0, 0], centroids[1, 0] = 1.0, -1.0
    x = (centroids[0] + torch.randn(n, d, generator=generator)).bfloat16().float()
    x[:, 0] = torch.where(torch.rand(n, generator=generator) < 0.5, 2.0**-20, -(2.0**-20))
    return x, centroids


def test_near_ties_go_to_the_same_centroid_on_every_path(tmp_path):
    """The first assignment of Elkan's bounds (a distance matrix), of Hamerly's and of the
    map-reduce Lloyd (nearest two by GEMM) is the exact one, ties below float32's resolution
    included: each settles near ties by exact distances (kmeans.NEAR_TIE)."""
    from gemma_assets.core import kmeans
    from gemma_assets.core.bf16 import bf16_to_bits
    from gemma_assets.core.engine import InProcess, Partitioned
    from gemma_assets.core.storage import ActivationStore

    x, centroids = _tied_rows()
    exact = (x.double()[:, None] - centroids.double()[None]).square().sum(2).argmin(1)
    store = ActivationStore(str(tmp_path))
    for index, rows in enumerate(x.split(1000)):
        positions = 1 + torch.arange(len(rows), dtype=torch.int32).numpy()  # no BOS rows: every row is read
        arrays = {"activations": bf16_to_bits(rows), "token_ids": positions.copy(), "positions": positions}
        store.write_partition(f"{index:04d}", arrays, {"context_len": 10**6, "bos_token_id": -1})
    partitions = Partitioned.of(InProcess(), store, store.committed_keys())
    mapped = kmeans._fit_lloyd_mapped(partitions, centroids, max_iter=0, tol=0.0)
    assert torch.equal(mapped.sizes, torch.bincount(exact, minlength=8))
    for bounds_mb in (ELKAN, HAMERLY):
        bounded = fit_kmeans(x, 8, max_iter=0, tol=0.0, init=centroids, bounds_mb=bounds_mb)
        assert torch.equal(bounded.centroids, mapped.centroids), bounds_mb
        assert torch.equal(bounded.sizes, mapped.sizes), bounds_mb
    assert torch.equal(kmeans.assign(x, centroids)[0], exact)

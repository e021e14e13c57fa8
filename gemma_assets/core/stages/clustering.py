"""whitening and cluster_models[k]: the clustering side of the comparison."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.storage

from gemma_assets.core import bootstrap, metrics, plots, progress
from gemma_assets.core.batches import map_data
from gemma_assets.core.cluster_metrics import cluster_quality
from gemma_assets.core.config import RunConfig, seed_name
from gemma_assets.core.dictionaries import Member, clustering_family, fit_gain_shape
from gemma_assets.core.engine import Engine, Partitioned, Shard
from gemma_assets.core.files import atomic_dir, save_arrays, write_json
from gemma_assets.core.kmeans import KMeansDictionary, KMeansResult, assign, fit_kmeans
from gemma_assets.core.layout import SEED_MODELS_FILE, SEEDS_FILE, WINDOWS_FILE, RunLayout
from gemma_assets.core.memory import RssTrace
from gemma_assets.core.records import DictionaryRecord, Family
from gemma_assets.core.storage import ActivationStore
from gemma_assets.core.whitening import Preprocessor, Whitening, identity_deviation


@dataclass(frozen=True)
class WhiteningRecord:
    heldout_identity_max_abs_deviation: float
    inverse_roundtrip_max_rel_error: float
    eigenvalue_floor: float
    condition_number: float
    eigen_spectrum: Path


def fit_whitening(layout: RunLayout, run: RunConfig) -> WhiteningRecord:
    """Mean and covariance eigendecomposition of the train split (BOS excluded); ZCA with an
    eigenvalue floor, checked on held-out tokens against the identity."""
    moments = layout.moments("train")
    fitted = Whitening.fit(moments.mean, moments.covariance)
    fitted.save(layout.whitening_file())
    zca = Preprocessor.from_whitening("zca", fitted)
    heldout, _ = layout.activation_store().load_tokens(run.heldout_partition_keys)
    whitened = zca.forward(heldout)
    roundtrip = float(((zca.inverse(whitened) - heldout).norm(dim=1) / heldout.norm(dim=1)).max())
    plot = plots.spectrum(
        fitted.eigenvalues, layout.whitening_file("eigen_spectrum.png"), "principal component", "variance (eigenvalue)"
    )
    condition = float(fitted.eigenvalues[0] / fitted.eigenvalues[-1])
    return WhiteningRecord(identity_deviation(whitened), roundtrip, float(fitted.floor), condition, plot)


@dataclass(frozen=True)
class TrainSplit:
    """The train split in the space k-means is fitted in, as store partitions on the run's engine:
    held in this process's memory when it fits `clustering.in_memory_mb` and the engine is this
    process; otherwise every pass streams the store (out of core, or on the cluster's workers)."""

    data: Partitioned
    preprocessor: Preprocessor
    tokens: int
    streamed: bool


def train_split(layout: RunLayout, run: RunConfig, engine: Engine) -> TrainSplit:
    spec = run.clustering
    preprocessor = layout.preprocessor(spec.preprocessing, spec.n_components)
    moments = layout.moments("train")
    partitions = Partitioned.of(engine, layout.activation_store(), run.train_partition_keys, preprocessor.forward)
    streamed = partitions.distributed or moments.count * moments.d_model * 4 > spec.in_memory_mb * 2**20
    return TrainSplit(partitions if streamed else partitions.in_memory(), preprocessor, moments.count, streamed)


def _kmeans_facts(run: RunConfig, result: KMeansResult, peak_mb: float) -> dict:
    spec = run.clustering
    return {
        "preprocessing": spec.preprocessing,
        "n_components": spec.n_components,
        "backend": spec.backend,
        "seeding": spec.seeding,
        "iterations": result.n_iter,
        "converged": result.converged,
        "fit_seconds": result.fit_seconds,
        "fit_peak_rss_mb": peak_mb,
        "distances_skipped_share": result.distances_skipped_share,
        "train_inertia": result.inertia_curve[-1],
        "dead_clusters_train": int((result.sizes == 0).sum()),
    }


@dataclass(frozen=True)
class _SeededFit:
    """k-means-k and its readings fitted with one seed, evaluated on held-out windows."""

    seed: int
    kmeans: KMeansResult
    kmeans_peak_mb: float
    gain_shape_atoms: torch.Tensor
    spherical: KMeansResult
    family: list[Member]
    evaluated: dict[str, tuple[dict, bootstrap.WindowSums]]  # by member name

    @property
    def kmeans_dictionary(self) -> KMeansDictionary:
        """The nearest-centroid reading: `clustering_family` puts it first."""
        dictionary = self.family[0].dictionary
        assert isinstance(dictionary, KMeansDictionary)
        return dictionary

    def records(self, run: RunConfig, train: TrainSplit, quality: dict) -> list[DictionaryRecord]:
        facts = {
            "train_partitions": run.train_partition_keys,
            "train_tokens": train.tokens,
            "train_streamed": train.streamed,
            "seed": self.seed,
        }
        facts |= {"fit_seconds": self.kmeans.fit_seconds, "parameters": self.kmeans.centroids.numel()}  # top-m
        own_facts = {
            Family.KMEANS: _kmeans_facts(run, self.kmeans, self.kmeans_peak_mb),
            Family.GAIN_SHAPE: {"fit_seconds": self.spherical.fit_seconds, "iterations": self.spherical.n_iter},
        }
        return [
            DictionaryRecord.of_fit(
                seed_name(member.name, self.seed),
                member.family,
                len(self.kmeans.centroids),
                member.m,
                quality.get(member.family, {}) | self.evaluated[member.name][0],
                facts | own_facts.get(member.family, {}),
            )
            for member in self.family
        ]


def _fit_seeded(
    run: RunConfig,
    train: TrainSplit,
    heldout_windows: Partitioned,
    heldout_tokens: int,
    k: int,
    seed: int,
    device: str,
) -> _SeededFit:
    spec = run.clustering
    fit_args: dict[str, Any] = {
        "max_iter": spec.max_iter,
        "tol": spec.tol,
        "bounds_mb": spec.in_memory_mb,
        "seeding": spec.seeding,
        "device": device,
    }
    with RssTrace() as peak:
        result = fit_kmeans(train.data, k, seed=spec.seed + seed, backend=spec.backend, **fit_args)
    # the same clustering read as dictionaries with more shapes (gain-shape's directions come
    # from spherical k-means on the same tokens)
    # batch by batch even when the split is in memory: a second copy of a 36 GB split would not fit
    raw = map_data(train.data, train.preprocessor.inverse)
    gain_shape, spherical = fit_gain_shape(raw, train.preprocessor.shift, k, seed=spec.seed + seed, **fit_args)
    family = clustering_family(k, result.centroids, gain_shape.atoms, train.preprocessor)
    evaluated = {
        member.name: metrics.evaluate_windows(
            heldout_windows, member.dictionary, name=seed_name(member.name, seed), tokens=heldout_tokens
        )
        for member in family
    }
    return _SeededFit(seed, result, peak.mb, gain_shape.atoms, spherical, family, evaluated)


def fit_k(
    layout: RunLayout,
    run: RunConfig,
    train: TrainSplit,
    k: int,
    log: Callable[[str], None] = lambda _: None,
    device: str = "cpu",
) -> list[DictionaryRecord]:
    """K-means (exact Lloyd) on the train split, its gain-shape and top-m readings, their held-out
    metrics and the cluster of every stored token, written together under clusters/k-<k>/; with
    `seeds` > 1 also the refits with seeds 1.. (their records and centroids, no assignments)."""
    store = layout.activation_store()
    heldout_windows = Partitioned.of(train.data.engine, store, run.heldout_partition_keys)
    heldout_tokens = store.token_count(run.heldout_partition_keys)  # progress totals, read once
    fits = []
    for seed in range(run.seeds):
        fits.append(_fit_seeded(run, train, heldout_windows, heldout_tokens, k, seed, device))
        if run.seeds > 1:
            kmeans = fits[-1].family[0].name
            log(f"k={k}, seed {seed}: held-out FVU of {kmeans} {fits[-1].evaluated[kmeans][0]['fvu']:.4f}")
    first, *replicas = fits
    # cluster quality is read in the space k-means was fitted in
    heldout = store.batches(run.heldout_partition_keys, train.preprocessor.forward)
    quality = {Family.KMEANS: cluster_quality(heldout(), first.kmeans.centroids)}
    records = first.records(run, train, quality)
    seed_records: dict[str, list[dict[str, Any]]] = {member.name: [] for member in first.family}
    for fit in replicas:
        for member, record in zip(fit.family, fit.records(run, train, {}), strict=True):
            seed_records[member.name].append(record.to_json())
    with atomic_dir(layout.kmeans_dir(k)) as out:  # model, labels and metrics agree
        model = {
            "centroids": first.kmeans.centroids,
            "sizes": first.kmeans.sizes,
            "gain_shape_atoms": first.gain_shape_atoms,
        }
        save_arrays(
            out / "model.npz", {n: v.numpy() for n, v in model.items()} | {"inertia_curve": first.kmeans.inertia_curve}
        )
        everything = Partitioned.of(train.data.engine, store, run.partition_keys)
        write_assignments(out / "assignments", everything, first.kmeans_dictionary)
        write_json(out / "records.json", [record.to_json() for record in records])
        windows = {name: sums for name, (_, sums) in first.evaluated.items()}
        save_arrays(out / WINDOWS_FILE, bootstrap.flatten(windows))
        write_json(out / SEEDS_FILE, seed_records)
        save_arrays(out / SEED_MODELS_FILE, {f"seed{fit.seed}": fit.kmeans.centroids.numpy() for fit in replicas})
    return records


def write_assignments(path: Path, partitions: Partitioned, dictionary: KMeansDictionary) -> None:
    """Cluster of every stored token (-1 for BOS), one zarr array per partition, row-aligned with
    the activations; each partition labelled by a task of its engine, and written here beside
    the target, then renamed into place, so readers never see half of it."""
    k = len(dictionary.centroids)
    store = ActivationStore(partitions.shards[0].store_url)
    total = store.token_count([shard.key for shard in partitions.shards])
    with atomic_dir(path) as staging, progress.task(f"k={k} assignments", total, "tokens") as done:
        group = zarr.open_group(zarr.storage.LocalStore(str(staging)), mode="w")
        for shard, labels in zip(
            partitions.shards, partitions.engine.imap(partition_labels, partitions.shards, dictionary), strict=True
        ):
            group.create_array(f"part-{shard.key}", data=labels, chunks=(min(len(labels), 1 << 20),))
            done.advance(len(labels))


def partition_labels(shard: Shard, dictionary: KMeansDictionary) -> np.ndarray:
    """The nearest centroid of each row of a partition, -1 for BOS rows (stored, not assigned)."""
    store = ActivationStore(shard.store_url)
    labels = np.full(store.manifest(shard.key)["n_tokens"], -1, np.int32)
    for x, info in store.iter_tokens([shard.key]):
        labels[info["row"]] = assign(dictionary.preprocessor.forward(x), dictionary.centroids)[0].numpy()
    return labels


def describe_fit(records: list[DictionaryRecord]) -> str:
    """One log line for k-means-k and its readings."""
    kmeans, *others = records
    return (
        f"k={kmeans.k}: {kmeans.facts['iterations']} iterations in {kmeans.cost['fit_seconds']:.1f}s, "
        f"held-out FVU {kmeans.fvu:.4f}, " + ", ".join(f"{r.name} {r.fvu:.4f}" for r in others)
    )

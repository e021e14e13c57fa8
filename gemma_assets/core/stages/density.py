"""cluster_density[k] (diagonal GMM from k-means) and leader_clusters (Exemplar Partitioning)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from gemma_assets.core import bootstrap, interpret, leader, metrics
from gemma_assets.core.codes import Dictionary
from gemma_assets.core.config import RunConfig
from gemma_assets.core.engine import Engine, Partitioned
from gemma_assets.core.files import atomic_dir, save_arrays, write_json
from gemma_assets.core.gmm import fit_gmm, lowest_density
from gemma_assets.core.layout import WINDOWS_FILE, RunLayout
from gemma_assets.core.leader import fit_leader
from gemma_assets.core.memory import RssTrace
from gemma_assets.core.records import DictionaryRecord, Family

CONTEXT_TOKENS = 5  # tokens shown on each side of a lowest-density token


@dataclass(frozen=True)
class DensityRecord:
    """The mixture fitted from k-means-k, as density/k-<k>.json holds it."""

    k: int
    components: int
    train_partitions: list[str]
    em_iterations: int
    converged: bool
    train_log_likelihood_curve: list[float]
    heldout_mean_log_likelihood: float
    active_components: int
    # the lowest-density held-out tokens: log_likelihood, partition, row, position, context
    anomalies: list[dict[str, Any]]


def fit_density(
    layout: RunLayout, run: RunConfig, k: int, decode: Callable[[list[int]], str], engine: Engine
) -> DensityRecord:
    """Diagonal-covariance Gaussian mixture (streamed EM, its passes on `engine`) in whitened
    principal components, initialised from the k-means-k centroids; held-out log-likelihood per
    token and the lowest-density held-out tokens in context, written to density/k-<k>.json."""
    store = layout.activation_store()
    whitened = layout.whitening()
    space = layout.preprocessor("pca", min(run.density.components, len(whitened.mean)))
    kmeans_space = layout.preprocessor(run.clustering.preprocessing, run.clustering.n_components)
    centroids = torch.from_numpy(layout.kmeans_model(k)["centroids"])
    train = Partitioned.of(engine, store, run.train_partition_keys, space.forward)
    if not train.distributed and run.train_tokens * space.dim * 4 <= run.clustering.in_memory_mb * 2**20:
        # the projected split is small (components << d_model): read the store once, not once per EM pass
        train = train.in_memory()
    init = space.forward(kmeans_space.inverse(centroids))
    gmm = fit_gmm(train, init, max_iter=run.density.max_iter, tol=run.density.tol)
    heldout = store.batches(run.heldout_partition_keys, space.forward)
    total, count = 0.0, 0
    for x in heldout():
        total += float(gmm.log_likelihood(x).sum())
        count += len(x)
    with_info = store.iter_tokens(run.heldout_partition_keys, transform=space.forward)
    anomalies = lowest_density(gmm, with_info, run.density.anomalies)
    key_of = {int(key): key for key in run.partition_keys}  # the reader carries partitions as numbers
    for anomaly in anomalies:
        anomaly["partition"] = key_of[anomaly["partition"]]
        start = anomaly["row"] - anomaly["position"]  # only the anomaly's window is read
        ids = store.open(anomaly["partition"]).array("token_ids", start, start + run.sampling.context_len)
        row = np.array([anomaly["position"]])
        context = interpret.contexts_of(ids, row, run.sampling.context_len, CONTEXT_TOKENS, with_bos=False)[0]
        anomaly["context"] = interpret.context_text(context, decode)
    record = DensityRecord(
        k=k,
        components=space.dim,
        train_partitions=run.train_partition_keys,
        em_iterations=gmm.n_iter,
        converged=gmm.converged,
        train_log_likelihood_curve=gmm.log_likelihood_curve,
        heldout_mean_log_likelihood=total / count,
        active_components=int((gmm.weights > 0).sum()),
        anomalies=anomalies,
    )
    write_json(layout.density_file(k), asdict(record))
    return record


def fit_leader_regions(layout: RunLayout, run: RunConfig, engine: Engine) -> list[DictionaryRecord]:
    """Leader clustering as in Exemplar Partitioning (centred, unit-norm tokens; a new region when
    every exemplar is farther than a percentile-set cosine threshold), read two ways: gain-shape
    on the exemplar direction, and the mean of the region's train tokens; both evaluated on the
    same held-out tokens as every other dictionary (on `engine`) and written under clusters/leader/."""
    store = layout.activation_store()
    mean = torch.from_numpy(layout.whitening().mean).float()
    started = time.perf_counter()
    with RssTrace() as peak:
        result = fit_leader(
            store.batches(run.train_partition_keys)(),
            mean,
            run.leader.percentile,
            store.token_count(run.train_partition_keys),
        )
    fit_seconds = time.perf_counter() - started
    means = leader.region_means(store.batches(run.train_partition_keys)(), result.exemplars, mean)
    readings: dict[Family, Dictionary] = {
        Family.LEADER: result.dictionary(),
        Family.LEADER_MEAN: leader.RegionMeanDictionary(result.exemplars, mean, means),
    }
    heldout_windows = Partitioned.of(engine, store, run.heldout_partition_keys)
    tokens = store.token_count(run.heldout_partition_keys)
    evaluated = {
        family: metrics.evaluate_windows(heldout_windows, d, name=family.value, tokens=tokens)
        for family, d in readings.items()
    }
    facts = {
        "train_partitions": run.train_partition_keys,
        "fit_seconds": fit_seconds,
        "fit_peak_rss_mb": peak.mb,
        "threshold": result.threshold,
        "tokens_seen": result.n_tokens_seen,
        "stopped_early": result.stopped_early,
        "parameters": result.exemplars.numel(),
    }
    k = len(result.exemplars)
    names = {Family.LEADER: f"leader-{k}", Family.LEADER_MEAN: f"leader-{k}-mean"}
    records = [DictionaryRecord.of_fit(names[f], f, k, 1, evaluated[f][0], facts) for f in readings]
    with atomic_dir(layout.leader_dir) as folder:
        arrays = {"exemplars": result.exemplars, "mean": mean, "counts": result.counts, "region_means": means}
        save_arrays(folder / "model.npz", {name: value.numpy() for name, value in arrays.items()})
        write_json(folder / "records.json", [record.to_json() for record in records])
        save_arrays(folder / WINDOWS_FILE, bootstrap.flatten({names[f]: evaluated[f][1] for f in readings}))
    return records

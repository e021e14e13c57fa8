"""cluster_density[k] (diagonal GMM from k-means) and leader_clusters (Exemplar Partitioning)."""

import time

import dagster as dg
import numpy as np
import polars as pl
import torch

from gemma_assets.core import leader, metrics, model
from gemma_assets.core.config import RunConfig
from gemma_assets.core.files import atomic_dir, write_json
from gemma_assets.core.gmm import fit_gmm, lowest_density
from gemma_assets.core.leader import fit_leader
from gemma_assets.core.memory import PeakRss
from gemma_assets.core.storage import ActivationStore
from gemma_assets.core.whitening import Preprocessor, Whitening
from gemma_assets.defs.common import FOLLOW_UPSTREAM, code_version, markdown_table, model_source
from gemma_assets.defs.resources import RunResource, StorageResource

CONTEXT_TOKENS = 5  # tokens shown on each side of a highlighted token


def token_in_context(
    store: ActivationStore, tokenizer, partition: str, row: int, position: int, context_len: int
) -> str:
    """The window's text around one token, the token itself in [[double brackets]]."""
    start = row - position
    ids = store.open(partition).array("token_ids", start, start + context_len)
    before = tokenizer.decode(ids[max(1, position - CONTEXT_TOKENS) : position])
    after = tokenizer.decode(ids[position + 1 : position + 1 + CONTEXT_TOKENS])
    return f"{before}[[{tokenizer.decode(ids[position : position + 1])}]]{after}".replace("\n", "\\n").replace("|", "/")


def build_density_assets(
    run_config: RunConfig, cluster_models: dg.AssetsDefinition, whitening: dg.AssetsDefinition, k_partitions
) -> list:
    @dg.asset(
        partitions_def=k_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=[cluster_models],
        # 2: the record moved to density/k-NNNNN.json
        code_version=code_version("2", run_config, ("density",), [cluster_models]),
        automation_condition=FOLLOW_UPSTREAM,
        group_name="clustering",
        kinds={"pytorch"},
    )
    def cluster_density(
        context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Diagonal-covariance Gaussian mixture (streamed EM) in whitened principal components,
        initialised from the k-means centroids; held-out log-likelihood per token and the
        lowest-density held-out tokens shown in context."""
        prof = run.config
        store = storage.activation_store()
        whitened = Whitening.load(storage.path("whitening", "whitening.npz"))
        space = Preprocessor.from_whitening("pca", whitened, min(prof.density.components, len(whitened.mean)))
        kmeans_space = Preprocessor.from_whitening(
            prof.clustering.preprocessing, whitened, prof.clustering.n_components
        )
        tokenizer = model.load_tokenizer(model_source(prof, storage))
        summary = {}
        for key in context.partition_keys:
            k = int(key)
            folder = storage.path("clusters", f"k-{k:05d}")
            centroids = torch.from_numpy(np.load(folder / "model.npz")["centroids"])
            gmm = fit_gmm(
                lambda: (x for x, _ in store.iter_tokens(prof.train_partition_keys, transform=space.forward)),
                space.forward(kmeans_space.inverse(centroids)),
                max_iter=prof.density.max_iter,
                tol=prof.density.tol,
            )
            total, count = 0.0, 0
            for x, _ in store.iter_tokens(prof.heldout_partition_keys, transform=space.forward):
                total += float(gmm.log_likelihood(x).sum())
                count += len(x)
            anomalies = lowest_density(
                gmm, store.iter_tokens(prof.heldout_partition_keys, transform=space.forward), prof.density.anomalies
            )
            for anomaly in anomalies:
                anomaly["partition"] = f"{int(anomaly['partition']):04d}"  # the reader carries it as a number
                anomaly["context"] = token_in_context(
                    store,
                    tokenizer,
                    anomaly["partition"],
                    anomaly["row"],
                    anomaly["position"],
                    prof.sampling.context_len,
                )
            record = {
                "k": k,
                "components": space.forward_matrix.shape[1],
                "train_partitions": prof.train_partition_keys,
                "em_iterations": gmm.n_iter,
                "converged": gmm.converged,
                "train_log_likelihood_curve": gmm.log_likelihood_curve,
                "heldout_mean_log_likelihood": total / count,
                "active_components": int((gmm.weights > 0).sum()),
                "anomalies": anomalies,
            }
            write_json(storage.path("density", f"k-{k:05d}.json"), record)
            context.log.info(
                f"k={k}: GMM held-out mean log-likelihood {record['heldout_mean_log_likelihood']:.2f} per token"
            )
            summary[key] = record
        return dg.MaterializeResult(
            metadata={
                **{
                    f"k={key}_heldout_mean_log_likelihood": r["heldout_mean_log_likelihood"]
                    for key, r in summary.items()
                },
                "lowest_density_tokens": dg.MetadataValue.md(
                    markdown_table(
                        pl.DataFrame(
                            [
                                {
                                    "k": r["k"],
                                    "log_likelihood": a["log_likelihood"],
                                    "partition": a["partition"],
                                    "row": a["row"],
                                    "context": a["context"],
                                }
                                for r in summary.values()
                                for a in r["anomalies"][:5]
                            ]
                        )
                    )
                ),
            }
        )

    @dg.asset(
        deps=[whitening],
        code_version=code_version("1", run_config, ("leader",), [whitening]),
        automation_condition=FOLLOW_UPSTREAM,
        group_name="clustering",
        kinds={"pytorch"},
    )
    def leader_clusters(
        context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Leader clustering as in Exemplar Partitioning (centred, unit-norm tokens; a new region
        when every exemplar is farther than a percentile-set cosine threshold), evaluated on the
        same held-out tokens as every other dictionary."""
        prof = run.config
        store = storage.activation_store()
        mean = torch.from_numpy(Whitening.load(storage.path("whitening", "whitening.npz")).mean).float()
        started = time.perf_counter()
        with PeakRss() as peak:
            result = fit_leader(
                (x for x, _ in store.iter_tokens(prof.train_partition_keys)), mean, prof.leader.percentile
            )
        fit_seconds = time.perf_counter() - started
        heldout = metrics.evaluate((x for x, _ in store.iter_tokens(prof.heldout_partition_keys)), result.dictionary())
        record = {
            "name": f"leader-{len(result.exemplars)}",
            "family": leader.FAMILY,
            "k": len(result.exemplars),
            "m": 1,
            "train_partitions": prof.train_partition_keys,
            "fit_seconds": fit_seconds,
            "fit_peak_rss_mb": peak.mb,
            "threshold": result.threshold,
            "tokens_seen": result.n_tokens_seen,
            "stopped_early": result.stopped_early,
            "parameters": result.exemplars.numel(),
            **{f"heldout_{name}": value for name, value in heldout.items()},
        }
        with atomic_dir(storage.path("clusters", "leader")) as folder:
            np.savez(
                folder / "model.npz",
                exemplars=result.exemplars.numpy(),
                mean=mean.numpy(),
                counts=result.counts.numpy(),
            )
            write_json(folder / "metrics.json", record)
        context.log.info(f"leader clustering: {record['k']} regions, held-out FVU {heldout['fvu']:.4f}")
        return dg.MaterializeResult(
            metadata={
                "regions": record["k"],
                "threshold": result.threshold,
                "heldout_fvu": heldout["fvu"],
                "tokens_seen": result.n_tokens_seen,
            }
        )

    return [cluster_density, leader_clusters]

"""whitening and cluster_models[k]: the clustering side of the comparison."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import zarr
import zarr.storage

from gemma_assets.core import metrics, plots
from gemma_assets.core.cluster_metrics import cluster_quality
from gemma_assets.core.config import RunConfig
from gemma_assets.core.dictionaries import clustering_family, fit_gain_shape
from gemma_assets.core.files import atomic_dir, write_json
from gemma_assets.core.kmeans import KMeansDictionary, assign, fit_kmeans, map_data
from gemma_assets.core.memory import PeakRss
from gemma_assets.core.stats import ActivationMoments
from gemma_assets.core.storage import ActivationStore
from gemma_assets.core.whitening import Preprocessor, Whitening, identity_deviation
from gemma_assets.defs.common import FOLLOW_UPSTREAM, code_version, image_md
from gemma_assets.defs.resources import RunResource, StorageResource


def build_clustering_assets(
    run_config: RunConfig, activation_stats: dg.AssetsDefinition, k_partitions: dg.PartitionsDefinition
) -> list:
    @dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[activation_stats],
        code_version=code_version("1", run_config, upstream=[activation_stats]),
        group_name="clustering",
        kinds={"numpy"},
    )
    def whitening(
        context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Mean and covariance eigendecomposition of the train split (BOS excluded); ZCA with an
        eigenvalue floor, checked on held-out tokens against the identity."""
        moments = ActivationMoments.load(storage.path("stats", "train_moments.npz"))
        fitted = Whitening.fit(moments.mean, moments.covariance)
        fitted.save(storage.path("whitening", "whitening.npz"))
        zca = Preprocessor.from_whitening("zca", fitted)
        heldout, _ = storage.activation_store().load_tokens(run.config.heldout_partition_keys)
        whitened = zca.forward(heldout)
        deviation = identity_deviation(whitened)
        roundtrip = float(((zca.inverse(whitened) - heldout).norm(dim=1) / heldout.norm(dim=1)).max())
        context.log.info(f"held-out whitened covariance: max |C - I| = {deviation:.3g}")
        plot = plots.spectrum(
            fitted.eigenvalues,
            storage.path("whitening", "eigen_spectrum.png"),
            "principal component",
            "variance (eigenvalue)",
        )
        return dg.MaterializeResult(
            metadata={
                "heldout_identity_max_abs_deviation": deviation,
                "inverse_roundtrip_max_rel_error": roundtrip,
                "eigenvalue_floor": float(fitted.floor),
                "condition_number": float(fitted.eigenvalues[0] / fitted.eigenvalues[-1]),
                "eigen_spectrum": image_md(plot),
            }
        )

    @dg.asset(
        partitions_def=k_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),  # load the training tokens once for all k
        deps=[whitening],
        # 4: k-means|| seeding by default. The k values are partitions, not part of the version:
        # adding a k leaves the other k fresh
        code_version=code_version("4", run_config, ("clustering",), [whitening], exclude=("clustering.ks",)),
        automation_condition=FOLLOW_UPSTREAM,
        group_name="clustering",
        kinds={"pytorch", "zarr"},
    )
    def cluster_models(
        context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        """K-means (k-means++ init, exact Lloyd) fitted on the train split (in memory or streamed),
        its gain-shape and top-m readings, held-out metrics, and the cluster of every stored token."""
        prof = run.config
        store = storage.activation_store()
        preprocessor = Preprocessor.from_whitening(
            prof.clustering.preprocessing,
            Whitening.load(storage.path("whitening", "whitening.npz")),
            prof.clustering.n_components,
        )
        moments = ActivationMoments.load(storage.path("stats", "train_moments.npz"))
        streamed = moments.count * moments.d_model * 4 > prof.clustering.in_memory_mb * 2**20
        if streamed:  # out of core: every Lloyd iteration streams the store once
            train = lambda: (x for x, _ in store.iter_tokens(prof.train_partition_keys, transform=preprocessor.forward))  # noqa: E731
            context.log.info(f"train split larger than {prof.clustering.in_memory_mb} MB: streamed from the store")
        else:
            train = store.load_tokens(prof.train_partition_keys, transform=preprocessor.forward)[0]
        heldout_batches = lambda: (x for x, _ in store.iter_tokens(prof.heldout_partition_keys))  # noqa: E731
        common = {
            "train_partitions": prof.train_partition_keys,
            "train_tokens": moments.count,
            "train_streamed": streamed,
        }
        summary = {}
        for key in context.partition_keys:
            k = int(key)
            peak = PeakRss()
            with peak:
                result = fit_kmeans(
                    train,
                    k,
                    prof.clustering.max_iter,
                    prof.clustering.tol,
                    prof.clustering.seed,
                    backend=prof.clustering.backend,
                    bounds_mb=prof.clustering.in_memory_mb,
                    seeding=prof.clustering.seeding,
                )
            # the same clustering read as dictionaries with more shapes (gain-shape's directions
            # come from spherical k-means on the same tokens)
            gain_shape, spherical = fit_gain_shape(
                map_data(train, preprocessor.inverse),
                preprocessor.shift,
                k,
                max_iter=prof.clustering.max_iter,
                tol=prof.clustering.tol,
                seed=prof.clustering.seed,
                bounds_mb=prof.clustering.in_memory_mb,
                seeding=prof.clustering.seeding,
            )
            family = clustering_family(k, result.centroids, gain_shape.atoms, preprocessor)
            kmeans = family[0].dictionary
            fit_facts = {
                "k-means": {
                    "preprocessing": prof.clustering.preprocessing,
                    "n_components": prof.clustering.n_components,
                    "backend": prof.clustering.backend,
                    "seeding": prof.clustering.seeding,
                    "iterations": result.n_iter,
                    "converged": result.converged,
                    "fit_seconds": result.fit_seconds,
                    "fit_peak_rss_mb": peak.mb,
                    "distances_skipped_share": result.distances_skipped_share,
                    "train_inertia": result.inertia_curve[-1],
                    "dead_clusters_train": int((result.sizes == 0).sum()),
                    **{
                        f"heldout_{name}": value
                        for name, value in cluster_quality(
                            (preprocessor.forward(x) for x in heldout_batches()), result.centroids
                        ).items()
                    },
                },
                "gain-shape": {"fit_seconds": spherical.fit_seconds, "iterations": spherical.n_iter},
            }
            record, *variants = [
                {
                    "name": member.name,
                    "family": member.family,
                    "k": k,
                    "m": member.m,
                    **common,
                    "fit_seconds": result.fit_seconds,  # top-m reuses the k-means directions
                    "parameters": result.centroids.numel(),
                    **fit_facts.get(member.family, {}),
                    **{
                        f"heldout_{name}": value
                        for name, value in metrics.evaluate(heldout_batches(), member.dictionary).items()
                    },
                }
                for member in family
            ]
            with atomic_dir(storage.path("clusters", f"k-{k:05d}")) as out:  # model, labels and metrics agree
                np.savez(
                    out / "model.npz",
                    centroids=result.centroids.numpy(),
                    sizes=result.sizes.numpy(),
                    inertia_curve=np.array(result.inertia_curve),
                    gain_shape_atoms=gain_shape.atoms.numpy(),
                )
                write_assignments(out / "assignments", store, prof.partition_keys, kmeans)
                write_json(out / "metrics.json", record)
                write_json(out / "variants.json", variants)
            context.log.info(
                f"k={k}: {result.n_iter} iterations in {result.fit_seconds:.1f}s, held-out FVU {record['heldout_fvu']:.4f}, "
                + ", ".join(f"{v['name']} {v['heldout_fvu']:.4f}" for v in variants)
            )
            summary[key] = record
        return dg.MaterializeResult(
            metadata={
                f"k={key}": dg.MetadataValue.json(
                    {name: record[name] for name in ("heldout_fvu", "heldout_mse", "iterations", "fit_seconds")}
                )
                for key, record in summary.items()
            }
        )

    return [whitening, cluster_models]


def write_assignments(path: Path, store: ActivationStore, keys: list[str], dictionary: KMeansDictionary) -> None:
    """Cluster of every stored token (-1 for BOS), one zarr array per partition, row-aligned with
    the activations; written beside and renamed into place, so readers never see half of it."""
    with atomic_dir(path) as staging:
        group = zarr.open_group(zarr.storage.LocalStore(str(staging)), mode="w")
        for key in keys:
            labels = np.full(store.open(key).n_tokens, -1, np.int32)
            for x, info in store.iter_tokens([key]):
                labels[info["row"]] = assign(dictionary.preprocessor.forward(x), dictionary.centroids)[0].numpy()
            group.create_array(f"part-{key}", data=labels, chunks=(min(len(labels), 1 << 20),))


def load_cluster_metrics(storage: StorageResource, keys: list[str]) -> list[dict]:
    """Metric records of every k-means model and its variants, for the report."""
    records = []
    for key in keys:
        folder = storage.path("clusters", f"k-{int(key):05d}")
        if not (folder / "variants.json").exists():
            raise FileNotFoundError(f"no k-means model for k={key} in {folder}: materialise cluster_models[{key}]")
        records.append(json.loads((folder / "metrics.json").read_text()))
        records += json.loads((folder / "variants.json").read_text())
    return records

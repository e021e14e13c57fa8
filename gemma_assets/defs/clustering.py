"""whitening and cluster_models[k]: the clustering side of the comparison."""

import json

import dagster as dg
import numpy as np

from gemma_assets.core import metrics, plots
from gemma_assets.core.kmeans import KMeansDictionary, fit_kmeans
from gemma_assets.core.stats import ActivationMoments
from gemma_assets.core.whitening import Preprocessor, Whitening, identity_deviation
from gemma_assets.defs.common import FOLLOW_UPSTREAM, image_md
from gemma_assets.defs.resources import ProfileResource, StorageResource


def build_clustering_assets(activation_stats: dg.AssetsDefinition, k_partitions: dg.PartitionsDefinition) -> list:
    @dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[activation_stats],
        code_version="1",
        group_name="clustering",
        kinds={"numpy"},
    )
    def whitening(
        context: dg.AssetExecutionContext, profile: ProfileResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Mean and covariance eigendecomposition of the train split (BOS excluded); ZCA with an
        eigenvalue floor, checked on held-out tokens against the identity."""
        moments = ActivationMoments.load(storage.path("stats", "train_moments.npz"))
        fitted = Whitening.fit(moments.mean, moments.covariance)
        fitted.save(storage.path("whitening", "whitening.npz"))
        zca = Preprocessor.from_whitening("zca", fitted)
        heldout, _ = storage.activation_store().load_tokens(profile.profile.heldout_partition_keys)
        whitened = zca.forward(heldout)
        deviation = identity_deviation(whitened)
        roundtrip = float(((zca.inverse(whitened) - heldout).norm(dim=1) / heldout.norm(dim=1)).max())
        context.log.info(f"held-out whitened covariance: max |C - I| = {deviation:.3g}")
        plot = plots.eigen_spectrum(fitted.eigenvalues, storage.path("whitening", "eigen_spectrum.png"))
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
        code_version="1",
        automation_condition=FOLLOW_UPSTREAM,
        group_name="clustering",
        kinds={"pytorch"},
    )
    def cluster_models(
        context: dg.AssetExecutionContext, profile: ProfileResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        """K-means (k-means++ init, Lloyd) fitted on the train split, evaluated on held-out tokens."""
        prof = profile.profile
        store = storage.activation_store()
        preprocessor = Preprocessor.from_whitening(
            prof.kmeans.preprocessing, Whitening.load(storage.path("whitening", "whitening.npz"))
        )
        train, _ = store.load_tokens(prof.train_partition_keys, transform=preprocessor.forward)
        summary = {}
        for key in context.partition_keys:
            k = int(key)
            result = fit_kmeans(train, k, prof.kmeans.max_iter, prof.kmeans.tol, prof.kmeans.seed)
            dictionary = KMeansDictionary(result.centroids, preprocessor)
            heldout = metrics.evaluate(
                (x for x, _ in store.iter_tokens(prof.heldout_partition_keys)), dictionary.reconstruct
            )
            record = {
                "name": f"kmeans-{k}",
                "family": "k-means",
                "k": k,
                "preprocessing": prof.kmeans.preprocessing,
                "train_partitions": prof.train_partition_keys,
                "train_tokens": len(train),
                "iterations": result.n_iter,
                "converged": result.converged,
                "fit_seconds": result.fit_seconds,
                "train_inertia": result.inertia_curve[-1],
                "dead_clusters": int((result.sizes == 0).sum()),
                "parameters": result.centroids.numel(),
                **{f"heldout_{name}": value for name, value in heldout.items()},
            }
            out = storage.path("clusters", f"k-{k:05d}")
            out.mkdir(parents=True, exist_ok=True)
            np.savez(
                out / "model.npz",
                centroids=result.centroids.numpy(),
                sizes=result.sizes.numpy(),
                inertia_curve=np.array(result.inertia_curve),
            )
            (out / "metrics.json").write_text(json.dumps(record, indent=1))
            context.log.info(
                f"k={k}: {result.n_iter} iterations in {result.fit_seconds:.1f}s, held-out FVU {heldout['fvu']:.4f}"
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


def load_cluster_metrics(storage: StorageResource, keys: list[str]) -> list[dict]:
    records = []
    for key in keys:
        path = storage.path("clusters", f"k-{int(key):05d}", "metrics.json")
        if not path.exists():
            raise FileNotFoundError(f"no k-means model for k={key} at {path}: materialise cluster_models[{key}]")
        records.append(json.loads(path.read_text()))
    return records

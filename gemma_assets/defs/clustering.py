"""whitening and cluster_models[k]: the clustering side of the comparison, and the k-means method."""

import dagster as dg

from gemma_assets.core import methods
from gemma_assets.core.layout import WINDOWS_FILE
from gemma_assets.core.records import Family
from gemma_assets.core.stages import clustering
from gemma_assets.defs.common import (
    FOLLOW_UPSTREAM,
    GraphBuild,
    code_version,
    image_md,
    keeps_artefacts,
    reports_progress,
)
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource


@reports_progress
@keeps_artefacts
def whitening(context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource) -> dg.MaterializeResult:
    """Mean and covariance eigendecomposition of the train split (BOS excluded); ZCA with an
    eigenvalue floor, checked on held-out tokens against the identity."""
    fitted = clustering.fit_whitening(storage.layout(context), run.config)
    context.log.info(f"held-out whitened covariance: max |C - I| = {fitted.heldout_identity_max_abs_deviation:.3g}")
    return dg.MaterializeResult(
        metadata={
            "heldout_identity_max_abs_deviation": fitted.heldout_identity_max_abs_deviation,
            "inverse_roundtrip_max_rel_error": fitted.inverse_roundtrip_max_rel_error,
            "eigenvalue_floor": fitted.eigenvalue_floor,
            "condition_number": fitted.condition_number,
            "eigen_spectrum": image_md(fitted.eigen_spectrum),
        }
    )


@reports_progress
@keeps_artefacts
def cluster_models(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """K-means (k-means++ init, exact Lloyd) fitted on the train split (in memory or streamed),
    its gain-shape and top-m readings, held-out metrics, and the cluster of every stored token."""
    run_config, layout = run.config, storage.layout(context)
    metadata = {}
    with compute.engine(context.log.info) as engine:
        train = clustering.train_split(layout, run_config, engine)
        if train.streamed and not train.data.distributed:
            context.log.info(
                f"train split larger than {run_config.clustering.in_memory_mb} MB: streamed from the store"
            )
        for key in context.partition_keys:
            kmeans, *variants = records = clustering.fit_k(
                layout, run_config, train, int(key), context.log.info, compute.resolved_device
            )
            context.log.info(clustering.describe_fit(records))
            summary = {"heldout_fvu": kmeans.fvu, "heldout_mse": kmeans.heldout["mse"]}
            summary |= {"iterations": kmeans.facts["iterations"], "fit_seconds": kmeans.cost["fit_seconds"]}
            metadata[f"k={key}"] = dg.MetadataValue.json(summary)
    return dg.MaterializeResult(metadata=metadata)


def build(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    stats = graph["activation_stats"]
    whitening_asset = dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=graph.deps("activation_stats", "activations"),
        code_version=code_version("1", graph.run, upstream=[stats]),
        group_name="clustering",
        kinds={"numpy"},
    )(whitening)
    models = dg.asset(
        partitions_def=graph.k_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),  # load the training tokens once for all k
        deps=[whitening_asset, *graph.deps("activation_stats", "activations")],
        # 7: seed replicas. The k values are partitions, not part of the version: adding a k
        # leaves the other k fresh
        code_version=code_version(
            "7", graph.run, ("clustering", "seeds"), [whitening_asset], exclude=("clustering.ks",)
        ),
        automation_condition=FOLLOW_UPSTREAM,
        group_name="clustering",
        kinds={"pytorch", "zarr"},
    )(cluster_models)
    return [whitening_asset, models]


KMEANS = methods.register(
    methods.Method(
        name="k-means",
        module=__name__,
        build=build,
        dictionary_assets=("cluster_models",),
        record_assets=("cluster_models",),
        records=lambda layout, run: [record for k in run.clustering.ks for record in layout.kmeans_records(k)],
        window_files=lambda layout, run: [layout.kmeans_dir(k) / WINDOWS_FILE for k in run.clustering.ks],
        seed_records=lambda layout, run: {
            name: records for k in run.clustering.ks for name, records in layout.kmeans_seed_records(k).items()
        },
        members=lambda layout, run, device: layout.kmeans_members(run),
        # the clusters every other method's features are read against (defs/evaluation.py)
        interpreted=lambda layout, run, device: [m for m in layout.kmeans_members(run) if m.family is Family.KMEANS],
    )
)

"""cluster_density[k] (diagonal GMM from k-means) and leader_clusters (Exemplar Partitioning)."""

import dagster as dg

from gemma_assets.core import methods, model
from gemma_assets.core.layout import WINDOWS_FILE
from gemma_assets.core.report import markdown_table
from gemma_assets.core.stages import density
from gemma_assets.defs.common import FOLLOW_UPSTREAM, GraphBuild, code_version, keeps_artefacts, md, reports_progress
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource

ANOMALY_COLUMNS = ("k", "log_likelihood", "partition", "row", "context")


@reports_progress
@keeps_artefacts
def cluster_density(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Diagonal-covariance Gaussian mixture (streamed EM) in whitened principal components,
    initialised from the k-means centroids; held-out log-likelihood per token and the
    lowest-density held-out tokens shown in context."""
    run_config, layout = run.config, storage.layout(context)
    tokenizer = model.load_tokenizer(layout.model_source(run_config))
    metadata: dict[str, float | dg.MetadataValue] = {}
    anomalies: list[dict[str, object]] = []  # the lowest-density tokens of every k
    with compute.engine(context.log.info) as engine:
        for key in context.partition_keys:
            record = density.fit_density(layout, run_config, int(key), tokenizer.decode, engine)
            likelihood = record.heldout_mean_log_likelihood
            context.log.info(f"k={key}: GMM held-out mean log-likelihood {likelihood:.2f} per token")
            metadata[f"k={key}_heldout_mean_log_likelihood"] = likelihood
            anomalies += [{"k": record.k, **anomaly} for anomaly in record.anomalies[:5]]
    metadata["lowest_density_tokens"] = md(markdown_table(anomalies, ANOMALY_COLUMNS))
    return dg.MaterializeResult(metadata=metadata)


@reports_progress
@keeps_artefacts
def leader_clusters(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Leader clustering as in Exemplar Partitioning (centred, unit-norm tokens; a new region
    when every exemplar is farther than a percentile-set cosine threshold), evaluated on the
    same held-out tokens as every other dictionary."""
    with compute.engine(context.log.info) as engine:
        gain_shape, member_mean = density.fit_leader_regions(storage.layout(context), run.config, engine)
    context.log.info(
        f"leader clustering: {gain_shape.k} regions, held-out FVU {gain_shape.fvu:.4f} (gain-shape on the "
        f"exemplar), {member_mean.fvu:.4f} (member mean)"
    )
    metadata = {"regions": gain_shape.k, "threshold": gain_shape.facts["threshold"]}
    metadata |= {"heldout_fvu_gain_shape": gain_shape.fvu, "heldout_fvu_member_mean": member_mean.fvu}
    return dg.MaterializeResult(metadata=metadata | {"tokens_seen": gain_shape.facts["tokens_seen"]})


def build_density(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    models = graph["cluster_models"]
    return [
        dg.asset(
            partitions_def=graph.k_partitions,
            backfill_policy=dg.BackfillPolicy.single_run(),
            deps=[models, *graph.deps("whitening", "activations")],
            # 2: the record moved to density/k-NNNNN.json
            code_version=code_version("3", graph.run, ("density",), [models]),
            automation_condition=FOLLOW_UPSTREAM,
            group_name="clustering",
            kinds={"pytorch"},
        )(cluster_density)
    ]


def build_leader(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    return [
        dg.asset(
            deps=graph.deps("whitening", "activations"),
            # 4: the member-mean reading beside the gain-shape one, per-window sums
            code_version=code_version("4", graph.run, ("leader",), [graph["whitening"]]),
            automation_condition=FOLLOW_UPSTREAM,
            group_name="clustering",
            kinds={"pytorch"},
        )(leader_clusters)
    ]


# a density model, not a dictionary: its held-out likelihood and anomalies are its own asset's
GMM = methods.register(methods.Method(name="gmm", module=__name__, build=build_density))
LEADER = methods.register(
    methods.Method(
        name="leader",
        module=__name__,
        build=build_leader,
        dictionary_assets=("leader_clusters",),
        record_assets=("leader_clusters",),
        records=lambda layout, run: layout.leader_records(),
        window_files=lambda layout, run: [layout.leader_dir / WINDOWS_FILE],
        members=lambda layout, run, device: layout.leader_members(),
    )
)

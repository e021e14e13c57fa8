"""activation_stats: one streaming pass over every partition, and the cross-partition checks.

Input integrity and duplicate windows are ERROR and blocking (clustering must not run on corrupt
data); token-norm outliers, drift and the Great Expectations suite are WARN.
"""

import dagster as dg

from gemma_assets.core.report import frame_table
from gemma_assets.core.stages import statistics
from gemma_assets.defs.checks import check_result
from gemma_assets.defs.common import (
    FOLLOW_UPSTREAM,
    GraphBuild,
    code_version,
    image_md,
    keeps_artefacts,
    md,
    reads_artefacts,
    reports_progress,
)
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource

WARN = dg.AssetCheckSeverity.WARN


@reports_progress
@keeps_artefacts
def activation_stats(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Per-dimension mean/variance/min/max/quantiles and covariance (float64 sums, BOS excluded,
    merged exactly across partitions), token-norm tables by position and stratum, the largest
    activations and the tokens that carry them. The moments run on the compute device."""
    precision = compute.comoment_precision(run.config.quality.comoment_precision)
    with compute.engine(context.log.info) as engine:
        summary = statistics.summarise(
            storage.layout(context), run.config, context.log.info, precision, compute.resolved_device, engine
        )
    tables = summary.tables
    return dg.MaterializeResult(
        metadata={
            "summary": md(frame_table(tables["summary"])),
            "bos_mean_norm": summary.bos_mean_norm,
            "bos_to_token_norm_ratio": summary.bos_to_token_norm_ratio,
            "largest_activations": md(frame_table(tables["massive_tokens"])),
            "norm_by_stratum": md(frame_table(tables["by_stratum"])),
            "norm_by_position_first_5": md(frame_table(tables["by_position"].head(5))),
            "norm_histogram": image_md(summary.norm_histogram),
            "variance_spectrum": image_md(summary.variance_spectrum),
            "tables": dg.MetadataValue.path(str(summary.folder)),
        }
    )


@reads_artefacts
def inputs_intact(
    context: dg.AssetCheckExecutionContext, run: RunResource, storage: StorageResource
) -> dg.AssetCheckResult:
    """Every partition present, committed and matching its checksums; no NaN/Inf counted."""
    return check_result(statistics.inputs_intact(storage.layout(context), run.config))


@reads_artefacts
def no_duplicate_windows(
    context: dg.AssetCheckExecutionContext, run: RunResource, storage: StorageResource
) -> dg.AssetCheckResult:
    """No (document, offset) window sampled twice, within or across partitions."""
    return check_result(statistics.no_duplicate_windows(storage.layout(context), run.config))


@reads_artefacts
def token_norms_in_bounds(
    context: dg.AssetCheckExecutionContext, run: RunResource, storage: StorageResource
) -> dg.AssetCheckResult:
    """Robust z-score of log token norm (bounds learned from the train split, BOS excluded);
    WARN when the share of outliers exceeds the configured threshold."""
    return check_result(statistics.token_norms_in_bounds(storage.layout(context), run.config), WARN)


@reads_artefacts
def partition_drift(
    context: dg.AssetCheckExecutionContext, run: RunResource, storage: StorageResource
) -> dg.AssetCheckResult:
    """Per-dimension mean shift of each partition from the pooled mean, in pooled SDs."""
    return check_result(statistics.partition_drift(storage.layout(context), run.config), WARN)


@reads_artefacts
def stats_expectations(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    """Great Expectations suite over the per-dimension and summary tables."""
    return check_result(statistics.stats_expectations(storage.layout(context)), WARN)


def build(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    activations = graph["activations"]
    asset = dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=graph.deps("activations"),
        # the split (which partitions are held out), the quantile sample size and the co-moment's
        # precision as resolved here; the other quality keys are thresholds of checks, which have no version
        code_version=code_version(
            "2",
            graph.run,
            ("sampling", "quality.quantile_sample_per_partition"),
            [activations],
            depends_on=graph.comoment_precision,
        ),
        group_name="statistics",
        kinds={"numpy", "parquet"},
    )(activation_stats)
    # inputs_intact reads the store itself: the check depends on activations too
    blocking = [dg.asset_check(asset=asset, blocking=True, additional_deps=graph.deps("activations"))(inputs_intact)]
    blocking.append(dg.asset_check(asset=asset, blocking=True)(no_duplicate_windows))
    warning = [
        dg.asset_check(asset=asset)(check) for check in (token_norms_in_bounds, partition_drift, stats_expectations)
    ]
    return [asset, *blocking, *warning]

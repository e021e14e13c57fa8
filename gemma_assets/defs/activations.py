"""activations: block-L residual stream of every sampled token, one zarr partition per work unit,
and the per-partition checks (integrity, finite values: ERROR and blocking)."""

from collections.abc import Iterator

import dagster as dg

from gemma_assets.core import model
from gemma_assets.core.extraction import extract_partitions, store_attributes
from gemma_assets.core.stages import statistics
from gemma_assets.defs.checks import per_partition
from gemma_assets.defs.common import GraphBuild, code_version, reports_progress
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource

GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}}


@reports_progress
def activations(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Residual stream after block L (= hidden_states[L+1]) as exact bf16, with token ids,
    positions, document ids and strata; each partition committed atomically."""
    run_config, layout, device = run.config, storage.layout(context), compute.resolved_device
    source = layout.model_source(run_config)
    sample, tokenizer = layout.sample(), model.load_tokenizer(source)
    dtype = compute.torch_dtype(run_config.model.dtype)
    lm = model.load_model(source, run_config.model.layer, device, dtype)
    attrs = store_attributes(run_config, tokenizer, sample, dtype)
    store = layout.activation_store()
    done = extract_partitions(
        lm,
        sample,
        context.partition_keys,
        run_config,
        store,
        attrs,
        compute.batch_size,
        device,
        context.log.info,
    )
    return dg.MaterializeResult(
        metadata={
            "partitions": done.partitions,
            "tokens": done.tokens,
            "d_model": done.d_model,
            "layer": run_config.model.layer,
            "tokens_per_s": done.tokens_per_s,
            "device": device,
            "store": dg.MetadataValue.path(store.root),
        }
    )


def activations_integrity(
    context: dg.AssetCheckExecutionContext, run: RunResource, storage: StorageResource
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    """Committed, CRC32 of every chunk file as recorded, shapes/dtype/attributes, token ids in
    the vocabulary, positions 0..L-1 per window, BOS first; judged per partition."""
    layout = storage.layout(context)
    yield from per_partition(context, lambda key: statistics.partition_integrity(layout, run.config, key))


def activations_finite(
    context: dg.AssetCheckExecutionContext, run: RunResource, storage: StorageResource
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    """No NaN or Inf anywhere in the partition (BOS included); judged per partition."""
    layout = storage.layout(context)
    yield from per_partition(context, lambda key: statistics.partition_finite(layout, run.config, key))


def build(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    """`compute_dtype` is part of the version, so a store extracted on the CPU is stale on a GPU machine."""
    pile_sample = graph["pile_sample"]
    asset = dg.asset(
        partitions_def=graph.activation_partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),  # one model load for many partitions
        pool="gpu",
        op_tags=GPU_TAGS,
        deps=[pile_sample],
        # model.unquantised names a model to compare with, not the one extracted from
        code_version=code_version(
            "1", graph.run, ("model",), [pile_sample], exclude=("model.unquantised",), depends_on=graph.compute_dtype
        ),
        group_name="data",
        kinds={"zarr", "pytorch"},
    )(activations)
    check = dg.asset_check(asset=asset, partitions_def=graph.activation_partitions, blocking=True)
    # asset_check's type allows one AssetCheckResult; Dagster runs a generator of per-partition
    # evaluations too (per_partition), which a check over many partitions needs
    integrity = check(activations_integrity)  # type: ignore[arg-type]
    finite = check(activations_finite)  # type: ignore[arg-type]
    return [asset, integrity, finite]

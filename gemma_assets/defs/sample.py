"""pile_sample: stratified token windows from the run's corpus."""

import dagster as dg

from gemma_assets.core import model
from gemma_assets.core.report import frame_table
from gemma_assets.core.stages.sample import draw_sample
from gemma_assets.defs.common import GraphBuild, code_version, keeps_artefacts, md, reports_progress
from gemma_assets.defs.resources import RunResource, StorageResource


@reports_progress
@keeps_artefacts
def pile_sample(context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource) -> dg.MaterializeResult:
    """Token windows (BOS first, one document each) sampled at a fixed document rate, shuffled
    with the seed and dealt to activation partitions; the last partitions are held out."""
    run_config, layout = run.config, storage.layout(context)
    tokenizer = model.load_tokenizer(layout.model_source(run_config))
    census = draw_sample(layout, run_config, layout.corpus(run_config), tokenizer)
    spec, skipped = run_config.sampling, census.read.skipped
    context.log.info(f"sampled {spec.n_windows} windows x {spec.context_len} tokens into {layout.sample_file}")
    if skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
        context.log.warning(
            f"skipped {skipped.total()} bad corpus records ({reasons}), first: {census.read.first_skipped}"
        )
    return dg.MaterializeResult(
        metadata={
            "windows": spec.n_windows,
            "tokens": spec.n_windows * spec.context_len,
            "context_len": spec.context_len,
            "partitions": spec.partitions,
            "heldout_partitions": dg.MetadataValue.text(", ".join(run_config.heldout_partition_keys)),
            "strata": md(frame_table(census.strata)),
            "records_read": census.read.records,
            "skipped_records": skipped.total(),
            "path": dg.MetadataValue.path(str(layout.sample_file)),
        }
    )


def build(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    # the tokenizer depends on the model's source, not on its layer or dtype; `location` is part
    # of the root's version: outputs of the same config somewhere else are not these
    reads = ("model.kind", "model.name", "corpus", "sampling")
    version = code_version("1", graph.run, reads, depends_on=graph.location)
    return [dg.asset(code_version=version, group_name="data", kinds={"numpy"})(pile_sample)]

"""downstream_loss and interpretation: every dictionary through the model and in front of a reader."""

from dataclasses import asdict, fields

import dagster as dg
import torch

from gemma_assets.core import methods, model
from gemma_assets.core.environment import numeric_environment
from gemma_assets.core.findings import with_row_intervals
from gemma_assets.core.report import (
    ALIGNMENT_COLUMNS,
    PROBE_COLUMNS,
    SEED_AGREEMENT_COLUMNS,
    markdown_table,
)
from gemma_assets.core.stages import downstream, interpretation
from gemma_assets.defs.common import (
    FOLLOW_UPSTREAM,
    GraphBuild,
    code_version,
    image_md,
    keeps_artefacts,
    md,
    reports_progress,
)
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource

SPLICE_KEYS = ("evaluation.ce_windows", "evaluation.ce_batch_windows")
# besides the dictionaries: the held-out tokens, the train mean and the clustering space
SHARED_INPUTS = ("activations", "activation_stats", "whitening")


@reports_progress
@keeps_artefacts
def downstream_loss(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Next-token cross-entropy on held-out windows with block L's output replaced by each
    dictionary's reconstruction: delta CE vs the clean model and loss recovered vs zero- and
    mean-ablation (SAELens' definitions)."""
    run_config, layout, device = run.config, storage.layout(context), compute.resolved_device
    dtype = compute.torch_dtype(run_config.model.dtype)
    lm = model.load_model(layout.model_source(run_config), run_config.model.layer, device, dtype)
    members = methods.all_members(layout, run_config, methods.methods_of(run_config), device)
    result = downstream.spliced_losses(layout, run_config, lm, members, device)
    computed_on = {"device": device, "dtype": str(dtype), "batch_size": compute.batch_size}
    precision = compute.comoment_precision(run_config.quality.comoment_precision)
    downstream.save(layout, result, computed_on, numeric_environment(device, dtype, precision))
    ablations = {name: getattr(result, name) for name in downstream.CE_BASELINES}
    context.log.info(
        f"clean CE {result.clean_ce:.4f}, zero-ablation {result.zero_ablation_ce:.4f}, "
        f"mean-ablation {result.mean_ablation_ce:.4f} nats on {result.windows} windows"
    )
    columns = tuple(field.name for field in fields(downstream.SplicedDictionary))
    spliced = md(markdown_table([asdict(row) for row in result.dictionaries], columns))
    return dg.MaterializeResult(metadata={**ablations, "predicted_tokens": result.predicted_tokens, "spliced": spliced})


@reports_progress
@keeps_artefacts
def interpretation_asset(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """Clusters and SAE latents read side by side on held-out tokens: per-feature summaries
    and HTML pages, centroid/decoder alignment, activation-set F1 (as Exemplar Partitioning
    reports it) and sparse probes of source stratum and token class."""
    run_config, layout, device = run.config, storage.layout(context), compute.resolved_device
    source = layout.model_source(run_config)
    unembedding = model.load_model(source, run_config.model.layer, "cpu", torch.float32).get_output_embeddings().weight
    tokenizer = model.load_tokenizer(source)
    read = interpretation.interpret_dictionaries(
        layout, run_config, methods.methods_of(run_config), tokenizer, unembedding.detach(), device, context.log.info
    )
    tables = {  # value [95% interval] where the figure has one
        name: [with_row_intervals(row) for row in read.result[name]]
        for name in ("alignment", "seed_agreement", "probes")
    }
    return dg.MaterializeResult(
        metadata={
            "pages": dg.MetadataValue.path(str(read.site / "index.html")),
            "alignment": md(markdown_table(tables["alignment"], ALIGNMENT_COLUMNS)),
            "seed_agreement": md(markdown_table(tables["seed_agreement"], SEED_AGREEMENT_COLUMNS)),
            "probes": md(markdown_table(tables["probes"], PROBE_COLUMNS)),
            "alignment_histogram": image_md(read.alignment_histogram),
        }
    )


def dictionary_assets(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    """The assets that write the run's dictionaries, every method's."""
    return graph.upstream(*(asset for method in methods.methods_of(graph.run) for asset in method.dictionary_assets))


def build(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    dictionaries = dictionary_assets(graph)
    loss = dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[*dictionaries, *graph.deps(*SHARED_INPUTS)],
        # 3: blocks 0..L shared by every replacement; 4: the numeric environment it ran in; 5: uniform CE
        code_version=code_version("5", graph.run, ("clustering.ks", *SPLICE_KEYS), dictionaries),
        group_name="evaluation",
        pool="gpu",
        kinds={"pytorch"},
    )(downstream_loss)
    readings = dg.asset(
        name="interpretation",
        automation_condition=FOLLOW_UPSTREAM,
        deps=[*dictionaries, *graph.deps(*SHARED_INPUTS)],
        # every evaluation key but the spliced cross-entropy's; 2: agreement across seeds; 3: float64
        # histogram edges and mean activations
        code_version=code_version("3", graph.run, ("clustering.ks", "evaluation"), dictionaries, exclude=SPLICE_KEYS),
        group_name="evaluation",
        kinds={"pytorch", "html"},
    )(interpretation_asset)
    return [loss, readings]

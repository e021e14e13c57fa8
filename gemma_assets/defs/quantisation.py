"""quantisation_shift: the run's quantised checkpoint against the unquantised model it was made
from, on block L's output and through the pretrained SAEs (only where model.unquantised is set)."""

from dataclasses import asdict

import dagster as dg

from gemma_assets.core import report
from gemma_assets.core.stages import quantisation
from gemma_assets.defs.common import FOLLOW_UPSTREAM, GraphBuild, code_version, keeps_artefacts, md, reports_progress
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource


@reports_progress
@keeps_artefacts
def quantisation_shift(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """How far the quantised checkpoint moves block L's output from the unquantised model's on the
    held-out windows of the spliced cross-entropy (FVU, cosine, norm ratio), and each pretrained
    SAE's FVU on either model's activations; one skip line when the unquantised model is out of reach."""
    run_config, layout = run.config, storage.layout(context)
    dtype = compute.torch_dtype(run_config.model.dtype)
    result = quantisation.measure_shift(layout, run_config, compute.resolved_device, dtype, compute.batch_size)
    quantisation.save(layout, result)
    if isinstance(result, str):
        context.log.warning(result)
        return dg.MaterializeResult(metadata={"skipped": result})
    summary = report.quantisation_markdown(asdict(result))
    context.log.info(summary)
    return dg.MaterializeResult(
        metadata={
            "fvu": result.fvu.value,
            "cosine": result.cosine.value,
            "relative_norm": result.relative_norm.value,
            "tokens": result.tokens,
            "comparison": md(summary),
        }
    )


def build(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    if not graph.run.model.unquantised:
        return []  # a run without the comparison keeps the graph it had
    upstream = graph.upstream("activations", "sae_dictionary")
    return [
        dg.asset(
            automation_condition=FOLLOW_UPSTREAM,
            deps=graph.deps("activations", "sae_dictionary"),
            code_version=code_version("1", graph.run, ("model", "evaluation.ce_windows"), upstream),
            group_name="evaluation",
            pool="gpu",
            kinds={"pytorch"},
        )(quantisation_shift)
    ]

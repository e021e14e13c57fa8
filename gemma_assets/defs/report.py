"""comparison_report: every dictionary side by side on the same held-out tokens."""

import dagster as dg

from gemma_assets.core import methods, report
from gemma_assets.core.stages.report import write_report
from gemma_assets.defs.common import (
    FOLLOW_UPSTREAM,
    GraphBuild,
    code_version,
    image_md,
    keeps_artefacts,
    md,
    reports_progress,
)
from gemma_assets.defs.resources import RunResource, StorageResource


@reports_progress
@keeps_artefacts
def comparison_report(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource
) -> dg.MaterializeResult:
    """Markdown and HTML report (PNG plots, feature pages) answering the three experiments:
    clustering quality across k, computational cost, feature interpretation; report.json holds
    every figure with its 95% interval over held-out windows."""
    written = write_report(storage.layout(context), run.config, methods.methods_of(run.config))
    context.log.info(f"report written to {written.markdown} and {written.html}")
    table = report.markdown_table(written.rows, report.COLUMNS)  # value [95% interval over windows]
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.path(str(written.markdown)),
            "report_html": dg.MetadataValue.path(str(written.html)),
            "report_json": dg.MetadataValue.path(str(written.json)),
            "heldout_metrics": md(table),
            **{f"plot_{name}": image_md(figure) for name, figure in written.figures.items()},
            "findings": md(report.findings_markdown(written.findings)),
            "numeric_environment": dg.MetadataValue.json(written.numeric_environment),
        }
    )


def build(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    records = (asset for method in methods.methods_of(graph.run) for asset in method.record_assets)
    optional = [name for name in ("quantisation_shift",) if name in graph.assets]  # only where the run sets it
    inputs = graph.upstream(*records, "downstream_loss", "interpretation", *optional)
    return [
        dg.asset(
            automation_condition=FOLLOW_UPSTREAM,
            deps=[*inputs, *graph.deps("activation_stats")],
            # the report prints the whole resolved config
            # 3: bootstrap intervals and paired findings; 4: seeds, report.json; 5: numeric environment;
            # 6: floors (margins, dashed lines by width), findings led by mean ablation
            code_version=code_version("6", graph.run, ("",), inputs),
            group_name="report",
            kinds={"markdown", "html"},
        )(comparison_report)
    ]

"""itda_dictionaries: ITDA (Inference-Time Decomposition of Activations), a floor for the SAEs."""

import dagster as dg

from gemma_assets.core import methods
from gemma_assets.core.itda import itda_shapes
from gemma_assets.core.layout import WINDOWS_FILE
from gemma_assets.core.report import markdown_table
from gemma_assets.core.stages import itda
from gemma_assets.defs.common import FOLLOW_UPSTREAM, GraphBuild, code_version, keeps_artefacts, md, reports_progress
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource

TABLE_COLUMNS = ("name", "k", "m", "heldout_fvu", "heldout_l0", "threshold", "passes", "tokens_seen", "fit_seconds")


@reports_progress
@keeps_artefacts
def itda_dictionaries(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """ITDA (Leask, Nanda et al., arXiv 2505.17769): dictionaries of real train tokens (centred,
    unit-norm), each added when matching pursuit over the atoms so far leaves more than a
    threshold of its variance, coded with m atoms per token; at the trained SAEs' widths and
    evaluated on the same held-out tokens as every other dictionary."""
    with compute.engine(context.log.info) as engine:
        records = itda.fit_itda_dictionaries(storage.layout(context), run.config, engine)
    for record in records:
        context.log.info(
            f"{record.name}: held-out FVU {record.fvu:.4f}, L0 {record.l0:.2f} ({record.facts['passes']} passes, "
            f"final threshold {record.facts['threshold']:.3g})"
        )
    if not records:
        context.log.info("no ITDA dictionaries: itda.enabled is false, or no width (itda.widths, trained SAEs)")
    table = markdown_table([record.row() for record in records], TABLE_COLUMNS)
    return dg.MaterializeResult(metadata={"dictionaries": len(records), "heldout_metrics": md(table)})


def build(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    return [
        dg.asset(
            deps=graph.deps("whitening", "activations"),
            # the widths follow the trained SAEs' by default: the resolved shapes, not all of `saes`
            code_version=code_version(
                "1", graph.run, ("itda",), [graph["whitening"]], depends_on=str(itda_shapes(graph.run))
            ),
            automation_condition=FOLLOW_UPSTREAM,
            group_name="clustering",
            kinds={"pytorch"},
        )(itda_dictionaries)
    ]


ITDA = methods.register(
    methods.Method(
        name="itda",
        module=__name__,
        build=build,
        dictionary_assets=("itda_dictionaries",),
        record_assets=("itda_dictionaries",),
        records=lambda layout, run: layout.itda_records(run),
        window_files=lambda layout, run: [layout.itda_dir / WINDOWS_FILE] if itda_shapes(run) else [],
        members=lambda layout, run, device: layout.itda_members(run),
        # real-token atoms: their pages and alignment with the clusters show what the floor's features are
        interpreted=lambda layout, run, device: layout.itda_members(run),
    )
)

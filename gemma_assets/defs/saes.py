"""sae_dictionary and sae_evaluation: the SAE side of the comparison, through SAELens."""

import json

import dagster as dg

from gemma_assets.core import methods
from gemma_assets.core.report import markdown_table
from gemma_assets.core.stages import saes
from gemma_assets.defs.common import FOLLOW_UPSTREAM, GraphBuild, code_version, keeps_artefacts, md, reports_progress
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource

TRAINING_COLUMNS = (
    "name",
    "architecture",
    "width",
    "k",
    "target_l0",
    "l1_coefficient",
    "parameters",
    "train_tokens",
    "fit_seconds",
    "pass_seconds",
    "fit_peak_rss_mb",
    "load_seconds",
)
HELDOUT_COLUMNS = ("name", "heldout_fvu", "heldout_mse", "heldout_l0")


@reports_progress
@keeps_artefacts
def sae_dictionary(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """The run's SAEs: every trained architecture (TopK, BatchTopK, Matryoshka, JumpReLU, standard,
    and the random-decoder floor), on raw or whitened inputs, and seed replica trained with SAELens
    in one streamed pass over the stored train split, and pretrained SAEs (Gemma Scope) loaded with
    SAE.from_pretrained; an optional one that neither the cache nor the hub gives is skipped, one
    warning line each."""
    run_config, layout = run.config, storage.layout(context)
    rows = []
    for training in saes.make_saes(layout, run_config, compute.resolved_device):
        rows.append({key: value for key, value in training.to_json().items() if key != "train_partitions"})
        context.log.info(f"SAE {training.name}: {json.dumps(rows[-1])}")
    for name, reason in layout.sae_skipped().items():
        context.log.warning(methods.skipped_line(name, reason))
    return dg.MaterializeResult(metadata={"saes": md(markdown_table(rows, TRAINING_COLUMNS))})


@reports_progress
@keeps_artefacts
def sae_evaluation(
    context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """The metric suite (FVU computed by us, MSE, cosine, relative norm, L0, usage, encode
    throughput) of every SAE on held-out non-BOS tokens."""
    run_config, layout = run.config, storage.layout(context)
    evaluated, replicas = [], {}
    device = compute.resolved_device
    with compute.engine(context.log.info) as engine:
        for spec in layout.made_saes(run_config.sae_specs):
            evaluated.append(saes.evaluate_sae(layout, run_config, spec, device, engine))
            record = evaluated[-1][0]
            context.log.info(f"SAE {spec.name}: held-out FVU {record.fvu:.4f}, L0 {record.l0:.1f}")
        for name, specs in run_config.sae_seed_replicas.items():
            replicas[name] = [saes.evaluate_sae(layout, run_config, spec, device, engine)[0] for spec in specs]
            if specs:
                context.log.info(
                    f"SAE {name} over seeds: held-out FVU " + ", ".join(f"{r.fvu:.4f}" for r in replicas[name])
                )
    saes.save_evaluation(layout, evaluated, replicas)
    table = markdown_table([record.row() for record, _ in evaluated], HELDOUT_COLUMNS)
    return dg.MaterializeResult(metadata={"heldout_metrics": md(table)})


def build(graph: GraphBuild) -> list[dg.AssetsDefinition]:
    dictionary = dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=graph.deps("activation_stats", "whitening", "activations"),
        # 5: random-decoder SAEs, SAEs on whitened inputs (the whitening folded in)
        code_version=code_version("5", graph.run, ("saes", "seeds"), graph.upstream("activation_stats", "whitening")),
        group_name="sae",
        kinds={"pytorch"},
    )(sae_dictionary)
    evaluation = dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[dictionary, *graph.deps("activations")],
        # 6: SAEs on raw activations (no separate scale)
        code_version=code_version("6", graph.run, upstream=[dictionary]),
        group_name="sae",
        kinds={"pytorch"},
    )(sae_evaluation)
    return [dictionary, evaluation]


SAES = methods.register(
    methods.Method(
        name="saes",
        module=__name__,
        build=build,
        dictionary_assets=("sae_dictionary",),
        # sae_dictionary: the report names the optional SAEs it skipped
        record_assets=("sae_dictionary", "sae_evaluation"),
        records=lambda layout, run: layout.sae_records(),
        skipped=lambda layout, run: layout.sae_skipped(),
        window_files=lambda layout, run: [layout.sae_windows_file],
        seed_records=lambda layout, run: layout.sae_seed_records(),
        members=lambda layout, run, device: layout.sae_members(layout.made_saes(run.sae_specs), device),
        interpreted=lambda layout, run, device: layout.sae_members(layout.made_saes(run.sae_specs), device),
        replicas=lambda layout, run, member, device: layout.sae_members(
            run.sae_seed_replicas.get(member.name, ()), device
        ),
    )
)

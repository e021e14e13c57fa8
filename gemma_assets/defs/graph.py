"""The asset graph of one run config: assets, checks, jobs, schedule, sensors and resources."""

from __future__ import annotations

import dagster as dg

from gemma_assets.core import methods
from gemma_assets.core.config import RunConfig
from gemma_assets.core.layout import RunLayout
from gemma_assets.dagster_private import UnresolvedAssetJobDefinition
from gemma_assets.defs import activations, clustering, density, evaluation, itda, report, saes, sample, statistics  # noqa: F401 - clustering, density, itda, saes: importing them registers their methods
from gemma_assets.defs.common import GraphBuild
from gemma_assets.defs.operations import (
    CRASH_ONLY_RETRY_TAGS,
    TRANSIENT_RETRY_TAGS,
    automation_sensor,
    build_check_alert_sensor,
    build_extraction_schedule,
    console_logger,
)
from gemma_assets.defs.quantisation import build as build_quantisation_shift
from gemma_assets.defs.resources import (
    ComputeResource,
    OperationsResource,
    RunResource,
    StorageResource,
    default_data_root,
    normalised_data_root,
)

RUN_TAG = "gemma_assets/run"
CONFIG_DIGEST_TAG = "gemma_assets/config_digest"
# the methods' builders run between these, in registration order: a builder finds its upstream
# assets by name
INPUT_BUILDERS = (sample.build, activations.build, statistics.build)
# quantisation_shift joins only runs that set model.unquantised
EVALUATION_BUILDERS = (evaluation.build, build_quantisation_shift, report.build)


def build_graph(run: RunConfig, location: str) -> tuple[GraphBuild, list[dg.AssetChecksDefinition]]:
    """Every asset of the run (by name, in dependency order) and every asset check."""
    compute = ComputeResource()
    graph = GraphBuild(
        run,
        location,
        str(compute.torch_dtype(run.model.dtype)),
        compute.comoment_precision(run.quality.comoment_precision),
        dg.StaticPartitionsDefinition(run.partition_keys),
        dg.StaticPartitionsDefinition([str(k) for k in run.clustering.ks]),
    )
    checks = []
    builders = [*INPUT_BUILDERS, *(method.build for method in methods.methods_of(run)), *EVALUATION_BUILDERS]
    for build in builders:
        for definition in build(graph):
            if isinstance(definition, dg.AssetChecksDefinition):
                checks.append(definition)
            else:
                graph.assets[definition.key.to_user_string()] = definition
    return graph, checks


def build_jobs(graph: GraphBuild, tags: dict[str, str]) -> list[UnresolvedAssetJobDefinition]:
    """One job per partition definition (Dagster jobs cannot span assets with different ones);
    `gemma-assets materialize` and the UI's "Materialize all" run them all."""
    unpartitioned = [asset for asset in graph.assets.values() if asset.partitions_def is None]
    return [
        dg.define_asset_job(
            "extract_activations", selection=[graph["activations"]], tags={**tags, **TRANSIENT_RETRY_TAGS}
        ),
        dg.define_asset_job(
            "fit_cluster_models",
            selection=graph.upstream("cluster_models", "cluster_density"),
            tags={**tags, **TRANSIENT_RETRY_TAGS},
        ),
        dg.define_asset_job(
            "analyse", selection=dg.AssetSelection.assets(*unpartitioned), tags={**tags, **CRASH_ONLY_RETRY_TAGS}
        ),
    ]


def build_definitions(run: RunConfig, data_root: str | None = None) -> dg.Definitions:
    data_root = normalised_data_root(data_root or default_data_root())
    graph, checks = build_graph(run, RunLayout.of(data_root, run.name).location)
    run_resource = RunResource.of(run)
    return dg.Definitions(
        assets=list(graph.assets.values()),
        asset_checks=checks,
        jobs=build_jobs(graph, {RUN_TAG: run.name, CONFIG_DIGEST_TAG: run.digest()}),
        schedules=[build_extraction_schedule(graph["activations"])],
        sensors=[automation_sensor, build_check_alert_sensor()],
        resources={
            "run": run_resource,
            "storage": StorageResource(data_root=data_root, run=run_resource),
            "compute": ComputeResource.from_environment(),
            "operations": OperationsResource.from_environment(),
        },
        loggers={"console": console_logger},
    )

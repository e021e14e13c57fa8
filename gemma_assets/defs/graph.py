"""The asset graph of one run config: assets, checks, jobs, schedule, sensors and resources."""

from __future__ import annotations

import warnings
from pathlib import Path

import dagster as dg

from gemma_assets.core.config import RunConfig
from gemma_assets.defs.activations import build_activations_asset
from gemma_assets.defs.clustering import build_clustering_assets
from gemma_assets.defs.density import build_density_assets
from gemma_assets.defs.evaluation import build_evaluation_assets
from gemma_assets.defs.operations import (
    CRASH_ONLY_RETRY_TAGS,
    TRANSIENT_RETRY_TAGS,
    automation_sensor,
    build_check_alert_sensor,
    build_extraction_schedule,
    console_logger,
)
from gemma_assets.defs.report import build_report_asset
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource, default_data_root
from gemma_assets.defs.sae import build_sae_assets
from gemma_assets.defs.sampling import build_sample_asset
from gemma_assets.defs.stats import build_stats_assets

RUN_TAG = "gemma_assets/run"
CONFIG_DIGEST_TAG = "gemma_assets/config_digest"
# two features Dagster still labels beta/preview are used on purpose: single-run backfills
# (one model load for many partitions) and per-partition asset checks
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)


def activation_partitions(profile: RunConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(profile.partition_keys)


def k_partitions(profile: RunConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([str(k) for k in profile.clustering.ks])


def build_definitions(profile: RunConfig, data_root: str | None = None) -> dg.Definitions:
    data_root = str(Path(data_root or default_data_root()).resolve())
    partitions = activation_partitions(profile)
    pile_sample = build_sample_asset(profile, str(Path(data_root, profile.name)))
    compute_dtype = str(ComputeResource().torch_dtype(profile.model.dtype))
    activations = build_activations_asset(profile, partitions, pile_sample, compute_dtype)
    activation_stats, *stats_checks = build_stats_assets(profile, activations, partitions)
    whitening, cluster_models = build_clustering_assets(profile, activation_stats, k_partitions(profile))
    cluster_density, leader_clusters = build_density_assets(profile, cluster_models, whitening, k_partitions(profile))
    sae_dictionary, sae_evaluation = build_sae_assets(profile, activation_stats)
    downstream_loss, interpretation = build_evaluation_assets(profile, cluster_models, leader_clusters, sae_dictionary)
    comparison_report = build_report_asset(
        profile, cluster_models, leader_clusters, sae_evaluation, downstream_loss, interpretation
    )
    assets = [
        pile_sample,
        activations,
        activation_stats,
        whitening,
        cluster_models,
        cluster_density,
        leader_clusters,
        sae_dictionary,
        sae_evaluation,
        downstream_loss,
        interpretation,
        comparison_report,
    ]
    tags = {RUN_TAG: profile.name, CONFIG_DIGEST_TAG: profile.digest()}
    # Dagster jobs cannot span assets with different partition definitions, so there is one
    # job per definition; `gemma-assets materialize` and the UI's "Materialize all" run them all.
    jobs = [
        dg.define_asset_job("extract_activations", selection=[activations], tags={**tags, **TRANSIENT_RETRY_TAGS}),
        dg.define_asset_job(
            "fit_cluster_models", selection=[cluster_models, cluster_density], tags={**tags, **TRANSIENT_RETRY_TAGS}
        ),
        dg.define_asset_job(
            "analyse",
            selection=dg.AssetSelection.assets(*[asset for asset in assets if asset.partitions_def is None]),
            tags={**tags, **CRASH_ONLY_RETRY_TAGS},
        ),
    ]
    run = RunResource.of(profile)
    resources = {
        "run": run,
        "storage": StorageResource(data_root=data_root, run=run),
        "compute": ComputeResource(),
    }
    return dg.Definitions(
        assets=assets,
        asset_checks=stats_checks,
        jobs=jobs,
        schedules=[build_extraction_schedule(activations)],
        sensors=[automation_sensor, build_check_alert_sensor()],
        resources=resources,
        loggers={"console": console_logger},
    )

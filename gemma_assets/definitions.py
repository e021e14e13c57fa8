"""The code location: one Definitions object for the profile named by $GEMMA_ASSETS_PROFILE."""

from __future__ import annotations

import warnings

import dagster as dg

from gemma_assets.core.profiles import Profile, get_profile
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
)
from gemma_assets.defs.report import build_report_asset
from gemma_assets.defs.resources import ComputeResource, ProfileResource, StorageResource, default_data_root
from gemma_assets.defs.sae import build_sae_assets
from gemma_assets.defs.sampling import pile_sample
from gemma_assets.defs.stats import build_stats_assets

PROFILE_TAG = "gemma_assets/profile"
# two features Dagster still labels beta/preview are used on purpose: single-run backfills
# (one model load for many partitions) and per-partition asset checks
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)


def activation_partitions(profile: Profile) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(profile.partition_keys)


def k_partitions(profile: Profile) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([str(k) for k in profile.kmeans.ks])


def build_definitions(profile: Profile, data_root: str | None = None) -> dg.Definitions:
    partitions = activation_partitions(profile)
    activations = build_activations_asset(partitions)
    activation_stats, *stats_checks = build_stats_assets(activations, partitions)
    whitening, cluster_models = build_clustering_assets(activation_stats, k_partitions(profile))
    cluster_density, leader_clusters = build_density_assets(cluster_models, whitening, k_partitions(profile))
    sae_dictionary, sae_evaluation = build_sae_assets(activation_stats)
    downstream_loss, interpretation = build_evaluation_assets(cluster_models, leader_clusters, sae_dictionary)
    comparison_report = build_report_asset(
        cluster_models, leader_clusters, sae_evaluation, downstream_loss, interpretation
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
    tags = {PROFILE_TAG: profile.name}
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
    resources = {
        "profile": ProfileResource(name=profile.name),
        "storage": StorageResource(data_root=data_root or default_data_root(), profile=profile.name),
        "compute": ComputeResource(),
    }
    return dg.Definitions(
        assets=assets,
        asset_checks=stats_checks,
        jobs=jobs,
        schedules=[build_extraction_schedule(activations)],
        sensors=[automation_sensor, build_check_alert_sensor()],
        resources=resources,
    )


defs = build_definitions(get_profile())

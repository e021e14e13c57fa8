"""`gemma-assets`: materialise the whole asset graph through Dagster, or start the UI."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from gemma_assets.core.profiles import PROFILE_ENV_VAR, PROFILES, ConfigError, get_profile
from gemma_assets.defs.resources import DATA_ROOT_ENV_VAR


def ensure_dagster_home() -> Path:
    """$DAGSTER_HOME, defaulting to ./.dagster_home seeded with the project's dagster.yaml."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    project_config = Path.cwd() / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and project_config.exists():
        shutil.copy(project_config, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _stages(defs: dg.Definitions, profile) -> list[tuple[str, str, list[str] | None, dict]]:
    """(label, job, asset keys or None for the whole job, extra tags) in dependency order."""

    def whole_range(keys: list[str]) -> dict:
        return {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}

    return [
        ("sample token windows", "analyse", ["pile_sample"], {}),
        (
            f"extract activations ({profile.sample.n_partitions} partitions)",
            "extract_activations",
            None,
            whole_range(profile.partition_keys),
        ),
        (
            "statistics, checks, whitening, SAEs",
            "analyse",
            ["activation_stats", "whitening", "leader_clusters", "sae_dictionary", "sae_evaluation"],
            {},
        ),
        (
            f"k-means, variants and density for k in {list(profile.kmeans.ks)}",
            "fit_cluster_models",
            None,
            whole_range([str(k) for k in profile.kmeans.ks]),
        ),
        (
            "spliced cross-entropy, feature interpretation, comparison report",
            "analyse",
            ["downstream_loss", "interpretation", "comparison_report"],
            {},
        ),
    ]


def materialize_all(defs: dg.Definitions, instance: dg.DagsterInstance, log_level: str = "INFO") -> list:
    """Run every stage of the graph in the instance; stops at the first failed run."""
    profile = get_profile(defs.resolve_job_def("analyse").tags["gemma_assets/profile"])
    results = []
    stages = _stages(defs, profile)
    for number, (label, job_name, keys, tags) in enumerate(stages, start=1):
        print(f"[{number}/{len(stages)}] {label} ...", flush=True)
        started = time.perf_counter()
        result = defs.resolve_job_def(job_name).execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey(key) for key in keys] if keys else None,
            tags=tags,
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
            raise_on_error=False,
        )
        if not result.success:
            failed = [event.message for event in result.all_events if event.is_failure]
            raise SystemExit(f"stage '{label}' failed (run {result.run_id}):\n" + "\n".join(failed[-3:]))
        print(f"[{number}/{len(stages)}] {label}: done in {time.perf_counter() - started:.0f}s", flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gemma-assets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("materialize", help="materialise the whole asset graph (every partition)")
    ui = commands.add_parser("ui", help="start `dagster dev` on this project")
    for command in (run, ui):
        command.add_argument("--profile", help=f"one of {', '.join(PROFILES)} (default: ${PROFILE_ENV_VAR} or demo)")
        command.add_argument("--data-root", help=f"where outputs go (default: ${DATA_ROOT_ENV_VAR} or ./data)")
    run.add_argument("--log-level", default="INFO", help="Dagster console log level (DEBUG shows per-batch progress)")
    args = parser.parse_args(argv)
    try:
        profile = get_profile(args.profile)
    except ConfigError as error:
        parser.error(str(error))
    os.environ[PROFILE_ENV_VAR] = profile.name
    if args.data_root:
        os.environ[DATA_ROOT_ENV_VAR] = str(Path(args.data_root).resolve())
    home = ensure_dagster_home()
    if args.command == "ui":
        sys.exit(subprocess.call(["dagster", "dev", "-w", "workspace.yaml"]))

    from gemma_assets.definitions import build_definitions

    defs = build_definitions(profile)
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        materialize_all(defs, instance, args.log_level)
    storage = defs.resources["storage"]
    print(
        f"\nall stages done in {time.perf_counter() - started:.0f}s (profile {profile.name}; runs recorded in {home})"
    )
    print(f"report: {storage.path('report', 'report.md')}")


if __name__ == "__main__":
    main()

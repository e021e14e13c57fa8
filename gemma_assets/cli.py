"""`gemma-assets`: materialise the asset graph of a run config through Dagster, start the UI,
or show and validate a run config."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._time import get_current_datetime

from gemma_assets.core.config import (
    CONFIG_ENV_VAR,
    RESOLVED_CONFIG_FILE,
    SHIPPED_CONFIGS,
    ConfigError,
    RunConfig,
    load_run_config,
    reference_markdown,
    save_resolved,
)
from gemma_assets.core.model import ModelAccessError
from gemma_assets.defs.operations import contiguous_ranges
from gemma_assets.defs.resources import DATA_ROOT_ENV_VAR, default_data_root

EXIT_CONFIG = 2  # the run config is invalid (argparse uses 2 for bad arguments too)
EXIT_MODEL_ACCESS = 3  # the model (or its config) cannot be reached

# What a stage runs, in dependency order: (label, job, assets). Partitioned jobs run one
# execution per contiguous range of the partitions that need it (one model load each).
STAGES = [
    ("sample token windows", "analyse", ["pile_sample"]),
    ("extract activations", "extract_activations", ["activations"]),
    (
        "statistics, checks, whitening, SAEs",
        "analyse",
        ["activation_stats", "whitening", "leader_clusters", "sae_dictionary", "sae_evaluation"],
    ),
    ("k-means, variants and density", "fit_cluster_models", ["cluster_models", "cluster_density"]),
    (
        "spliced cross-entropy, feature interpretation, comparison report",
        "analyse",
        ["downstream_loss", "interpretation", "comparison_report"],
    ),
]

Plan = dict[dg.AssetKey, list[str] | None]  # asset -> partitions to run (None: unpartitioned)


def ensure_dagster_home() -> Path:
    """$DAGSTER_HOME, defaulting to ./.dagster_home seeded with the project's dagster.yaml."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    project_config = Path.cwd() / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and project_config.exists():
        shutil.copy(project_config, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def stale_plan(defs: dg.Definitions, instance: dg.DagsterInstance, force: bool = False) -> Plan:
    """What must run: every asset (partition) Dagster does not find FRESH (missing, a new code
    version, which carries the config keys it reads, or new upstream data), and everything
    downstream of those. The UI's stale markers come from the same resolver."""
    graph = defs.resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, graph, view)
    plan: Plan = {}
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if not node.is_materializable:
            continue
        planned_parents = [parent for parent in node.parent_keys if parent in plan]
        if node.partitions_def is None:
            if force or planned_parents or resolver.get_status(key) != StaleStatus.FRESH:
                plan[key] = None
            continue
        keys = node.partitions_def.get_partition_keys()
        # a parent over other partitions (or none) feeds every partition of this asset
        same_partitions = [p for p in planned_parents if graph.get(p).partitions_def == node.partitions_def]
        if force or len(same_partitions) < len(planned_parents):
            wanted = keys
        else:
            from_parents = {partition for parent in same_partitions for partition in plan[parent] or ()}
            wanted = [
                partition
                for partition in keys
                if partition in from_parents or resolver.get_status(key, partition) != StaleStatus.FRESH
            ]
        if wanted:
            plan[key] = wanted
    return plan


@dataclass
class StageRun:
    assets: list[str]
    partitions: tuple[str, str] | None  # first and last of a contiguous range


def stage_runs(assets: list[str], plan: Plan, defs: dg.Definitions) -> list[StageRun]:
    """The executions of one stage: unpartitioned assets together; partitioned ones grouped by
    the partitions they need, one execution per contiguous range."""
    planned = [name for name in assets if dg.AssetKey(name) in plan]
    if not planned:
        return []
    graph = defs.resolve_asset_graph()
    partitions_def = graph.get(dg.AssetKey(planned[0])).partitions_def
    if partitions_def is None:
        return [StageRun(planned, None)]
    order = partitions_def.get_partition_keys()
    groups: dict[tuple[str, ...], list[str]] = {}
    for name in planned:
        groups.setdefault(tuple(plan[dg.AssetKey(name)] or ()), []).append(name)
    return [StageRun(names, span) for keys, names in groups.items() for span in contiguous_ranges(list(keys), order)]


def _describe(run: StageRun) -> str:
    if run.partitions is None:
        return ", ".join(run.assets)
    first, last = run.partitions
    span = first if first == last else f"{first}..{last}"
    return ", ".join(f"{name}[{span}]" for name in run.assets)


def materialize_all(
    run_config: RunConfig,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    log_level: str = "INFO",
    force: bool = False,
) -> list:
    """Run what is not up to date (everything with `force`), stage by stage; stops at the first
    failed run. Returns the execution results (empty when everything was up to date)."""
    plan = stale_plan(defs, instance, force)
    if not plan:
        print(f"nothing to do: every asset of run {run_config.name} is up to date (config {run_config.digest()})")
        return []
    results = []
    for number, (label, job_name, assets) in enumerate(STAGES, start=1):
        runs = stage_runs(assets, plan, defs)
        if not runs:
            print(f"[{number}/{len(STAGES)}] {label}: up to date", flush=True)
            continue
        print(f"[{number}/{len(STAGES)}] {label}: {'; '.join(_describe(r) for r in runs)} ...", flush=True)
        started = time.perf_counter()
        for stage_run in runs:
            tags = {}
            if stage_run.partitions:
                first, last = stage_run.partitions
                tags = {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}
            result = defs.resolve_job_def(job_name).execute_in_process(
                instance=instance,
                asset_selection=[dg.AssetKey(name) for name in stage_run.assets],
                tags=tags,
                run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
                raise_on_error=False,
            )
            if not result.success:
                failed = [event.message for event in result.all_events if event.is_failure]
                raise SystemExit(f"stage '{label}' failed (run {result.run_id}):\n" + "\n".join(failed[-3:]))
            results.append(result)
        print(f"[{number}/{len(STAGES)}] {label}: done in {time.perf_counter() - started:.0f}s", flush=True)
    return results


def _add_config_arguments(command: argparse.ArgumentParser, data_root: bool = True) -> None:
    command.add_argument(
        "--config",
        "--profile",
        dest="config",
        metavar="NAME_OR_PATH",
        help=f"run config: one of {', '.join(SHIPPED_CONFIGS)} or a YAML file (default: ${CONFIG_ENV_VAR} or demo)",
    )
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one value of the run config, e.g. --set model.layer=6 --set clustering.ks=[64,512]",
    )
    if data_root:
        command.add_argument("--data-root", help=f"where outputs go (default: ${DATA_ROOT_ENV_VAR} or ./data)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-assets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("materialize", help="materialise what is not up to date (every partition)")
    ui = commands.add_parser("ui", help="start `dagster dev` on a run config")
    config = commands.add_parser("config", help="show, validate or document run configs")
    actions = config.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the resolved run config (YAML)")
    validate = actions.add_parser(
        "validate", help="validate a run config against its model and SAEs, computing nothing"
    )
    actions.add_parser("reference", help="print the reference of every key (docs/configuration.md)")
    for command in (run, ui, validate):
        _add_config_arguments(command)
    _add_config_arguments(show, data_root=False)
    run.add_argument("--force", action="store_true", help="recompute everything, even what is up to date")
    run.add_argument("--log-level", default="INFO", help="Dagster console log level (DEBUG shows per-batch progress)")
    return parser


def _fail(message: str, code: int) -> None:
    print(f"gemma-assets: error: {message}", file=sys.stderr)
    sys.exit(code)


def _data_root(args: argparse.Namespace) -> str:
    if args.data_root is not None:
        os.environ[DATA_ROOT_ENV_VAR] = str(Path(args.data_root).resolve())
    return str(Path(default_data_root()).resolve())


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "config" and args.action == "reference":
        print(reference_markdown(), end="")
        return
    try:
        run_config = load_run_config(args.config, args.overrides)
        if args.command == "config" and args.action == "show":
            print(f"# run config {run_config.name}, digest {run_config.digest()}")
            print(run_config.to_yaml(), end="")
            return
        data_root = _data_root(args)
        if args.command == "ui":
            # the code location reads the resolved file, so the UI shows exactly this config
            resolved = save_resolved(run_config, Path(data_root, run_config.name, RESOLVED_CONFIG_FILE))
            os.environ[CONFIG_ENV_VAR] = str(resolved)
            ensure_dagster_home()
            sys.exit(subprocess.call(["dagster", "dev", "-w", "workspace.yaml"]))
        from gemma_assets.core.validation import validate_run

        architecture = validate_run(run_config, Path(data_root, "models"))
    except ConfigError as error:
        _fail(str(error), EXIT_CONFIG)
    except ModelAccessError as error:
        _fail(str(error), EXIT_MODEL_ACCESS)
    if args.command == "config":
        print(
            f"run config {run_config.name} is valid (digest {run_config.digest()}): {run_config.model.name}, "
            f"block {run_config.model.layer} of {architecture.n_layers}, d_model {architecture.d_model}; "
            f"{run_config.sampling.partitions} partitions of {run_config.sampling.windows_per_partition} windows x "
            f"{run_config.sampling.context_len} tokens ({run_config.train_tokens:,} train tokens); k in "
            f"{list(run_config.clustering.ks)}; {len(run_config.sae_specs)} SAEs; outputs in "
            f"{Path(data_root, run_config.name)}"
        )
        return

    from gemma_assets.defs.graph import build_definitions

    home = ensure_dagster_home()
    defs = build_definitions(run_config, data_root)
    save_resolved(run_config, Path(data_root, run_config.name, RESOLVED_CONFIG_FILE))
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        results = materialize_all(run_config, defs, instance, args.log_level, args.force)
    storage = defs.resources["storage"]
    if results:
        print(
            f"\nall stages done in {time.perf_counter() - started:.0f}s (run {run_config.name}; runs recorded in {home})"
        )
    print(f"report: {storage.path('report', 'report.md')}")


if __name__ == "__main__":
    main()

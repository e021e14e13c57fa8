"""`gemma-assets`: materialise the asset graph of a run config through Dagster, start the UI,
or show and validate a run config."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._core.utils import make_new_run_id
from dagster._time import get_current_datetime
from dagster._utils.interrupts import check_captured_interrupt

from gemma_assets.core.config import (
    CONFIG_ENV_VAR,
    SHIPPED_CONFIGS,
    ConfigError,
    RunConfig,
    load_run_config,
    reference_markdown,
    save_resolved,
)
from gemma_assets.core.corpus import CorpusError
from gemma_assets.core.files import writable_folder
from gemma_assets.core.layout import RunLayout
from gemma_assets.core.model import ModelAccessError
from gemma_assets.core.storage import ActivationStore, StorageError
from gemma_assets.defs.operations import contiguous_ranges
from gemma_assets.defs.recovery import (
    PoolWaitTimeout,
    describe_stale,
    mark_failed,
    process_tags,
    release_stale_runs,
    wait_for_pools,
)
from gemma_assets.defs.resources import DATA_ROOT_ENV_VAR, default_data_root

# Exit codes, one per kind of known failure; the cause and its fix are the last line printed.
EXIT_FAILED = 1  # a step failed for a reason the project does not know
EXIT_CONFIG = 2  # the run config or the data root is invalid (argparse uses 2 for bad arguments too)
EXIT_MODEL_ACCESS = 3  # the model (or its config) cannot be reached
EXIT_STORAGE = 4  # stored data is missing or corrupt
EXIT_CORPUS = 5  # the corpus cannot be read
EXIT_CHECK = 6  # a blocking data-quality check failed
EXIT_POOL_TIMEOUT = 7  # a pool slot stayed held by a live run past --wait-timeout
EXIT_DISAGREES = 8  # verify-report: a recomputed figure differs from its report beyond its tolerance
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM
KNOWN_ERRORS = {
    ConfigError: EXIT_CONFIG,
    ModelAccessError: EXIT_MODEL_ACCESS,
    StorageError: EXIT_STORAGE,
    CorpusError: EXIT_CORPUS,
    PoolWaitTimeout: EXIT_POOL_TIMEOUT,
}


class StageFailed(Exception):
    """A stage's run failed; `code` says how (one of the EXIT_ codes), the message why and the fix."""

    def __init__(self, message: str, code: int, details: str = "") -> None:
        super().__init__(message)
        self.code, self.details = code, details


@dataclass(frozen=True)
class Stage:
    """Assets of one job that can run together once the stages before them are done."""

    job: str
    assets: list[str]


def stages(defs: dg.Definitions) -> list[Stage]:
    """The jobs' assets in dependency order, cut where the job changes: each stage gathers every
    asset of its job whose upstream assets are done or in the stage. Partitioned jobs then run
    one execution per contiguous range of the partitions that need it (one model load each)."""
    graph = defs.resolve_asset_graph()
    job_of = {key: job.name for job in defs.jobs or () for key in job.selection.resolve(graph)}
    pending, done, result = list(graph.toposorted_asset_keys), set(), []
    while pending:
        job, members = job_of[pending[0]], []
        for key in pending:  # toposorted: an asset comes after everything it depends on
            if job_of[key] == job and graph.get(key).parent_keys <= done | set(members):
                members.append(key)
        pending = [key for key in pending if key not in members]
        done |= set(members)
        result.append(Stage(job, [key.to_user_string() for key in members]))
    return result


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


def stale_plan(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    force: bool = False,
    rerun: dict[dg.AssetKey, set[str | None]] | None = None,
) -> Plan:
    """What must run: every asset (partition) Dagster does not find FRESH (missing, a new code
    version, which carries the config keys it reads, or new upstream data), the partitions in
    `rerun` (None: the unpartitioned asset) whatever Dagster says, and everything downstream of
    those. The UI's stale markers come from the same resolver."""
    rerun = rerun or {}
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
            if force or planned_parents or None in rerun.get(key, ()) or resolver.get_status(key) != StaleStatus.FRESH:
                plan[key] = None
            continue
        keys = node.partitions_def.get_partition_keys()
        # a parent over other partitions (or none) feeds every partition of this asset
        same_partitions = [p for p in planned_parents if graph.get(p).partitions_def == node.partitions_def]
        # a failed check recorded without a partition (a run over many) names no one partition
        if force or len(same_partitions) < len(planned_parents) or None in rerun.get(key, ()):
            wanted = keys
        else:
            from_parents = {partition for parent in same_partitions for partition in plan[parent] or ()}
            from_parents |= rerun.get(key, set())
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


def failed_blocking_checks(defs: dg.Definitions, instance: dg.DagsterInstance) -> dict[dg.AssetKey, set[str | None]]:
    """Asset partitions (None: unpartitioned) whose latest evaluation of a blocking check did not
    pass. Dagster still counts them as materialised; rerunning must evaluate the check again,
    never go on to what it guards."""
    failed: dict[dg.AssetKey, set[str | None]] = {}
    for checks in defs.asset_checks or ():
        for spec in checks.check_specs:
            if not spec.blocking:
                continue
            latest: dict[str | None, AssetCheckExecutionRecordStatus] = {}
            for record in instance.event_log_storage.get_asset_check_execution_history(spec.key, limit=10_000):
                latest.setdefault(record.partition, record.status)  # newest first
            bad = {
                partition for partition, status in latest.items() if status == AssetCheckExecutionRecordStatus.FAILED
            }
            if bad:
                failed.setdefault(spec.asset_key, set()).update(bad)
    return failed


def damaged_partitions(store: ActivationStore, keys: Iterable[str], instance: dg.DagsterInstance) -> dict[str, str]:
    """Materialised activation partitions whose commit or files are gone from storage (one
    listing each; a flipped byte shows only when the chunk is read, as a StorageError)."""
    materialized = instance.get_materialized_partitions(dg.AssetKey("activations"))
    committed = set(store.committed_keys())
    damaged = {}
    for key in keys:
        if key not in materialized:
            continue  # missing, not damaged: the plan runs it anyway
        try:
            missing = store.missing_files(key) if key in committed else []
        except (StorageError, KeyError) as error:  # an unreadable commit is damage too
            damaged[key] = str(error).split(" -> ")[0]
            continue
        if key not in committed:
            damaged[key] = "its commit is gone"
        elif missing:
            damaged[key] = f"file {missing[0]} is missing" + (
                f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            )
    return damaged


class Interrupts:
    """Ctrl-C and SIGTERM stop the command within a second, at any stage, and mark the run in
    progress failed (which frees its pool slots). Dagster swaps in its own handlers while a run
    executes and only notes the signal, so a watcher thread acts on that note."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.run_id: str | None = None

    def __enter__(self) -> Interrupts:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda number, _frame: self.stop(signal.Signals(number).name))
        threading.Thread(target=self._watch, daemon=True, name="gemma-assets-interrupts").start()
        return self

    def __exit__(self, *exc: object) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

    def _watch(self) -> None:
        while True:
            if check_captured_interrupt():
                self.stop("SIGINT or SIGTERM")
            time.sleep(0.2)

    def stop(self, name: str) -> None:
        run = self.instance.get_run_by_id(self.run_id) if self.run_id else None
        if run is not None and not run.is_finished:
            try:
                mark_failed(self.instance, run, f"interrupted by {name}")
            except Exception:  # noqa: BLE001 - exiting regardless; the next command releases it
                pass
        where = f": run {self.run_id[:8]} marked failed" if run is not None else ""
        print(f"\ngemma-assets: interrupted by {name}{where}; run the same command again to continue", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)  # without unwinding: Dagster would hold the exit for its cleanup


def _errors(error) -> list:
    """A serialised error and its causes, outermost first."""
    chain = []
    while error is not None and len(chain) < 16:
        chain.append(error)
        error = error.cause or error.context
    return chain


def failure(result) -> StageFailed:
    """The cause of a failed run, as users should read it: a failed blocking check's description,
    or the message of the project error behind a step failure; the stack trace goes to details."""
    failed_checks = [e for e in result.get_asset_check_evaluations() if not e.passed and e.blocking]
    if failed_checks:
        check = failed_checks[0]
        where = check.asset_key.to_user_string() + (f"[{check.partition}]" if check.partition else "")
        return StageFailed(f"blocking check {check.check_name} failed on {where}: {check.description}", EXIT_CHECK)
    codes = {cls.__name__: code for cls, code in KNOWN_ERRORS.items()}
    step_errors = [
        event.step_failure_data.error
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error
    ]
    if any(cause.cls_name == "DagsterExecutionInterruptedError" for e in step_errors for cause in _errors(e)):
        # Dagster turns SIGINT/SIGTERM inside a step into this error and fails the run itself
        return StageFailed(
            f"interrupted by SIGINT or SIGTERM: run {result.run_id[:8]} marked failed; run the same command "
            "again to continue",
            EXIT_INTERRUPTED,
        )
    for error in step_errors:
        for cause in _errors(error):
            if cause.cls_name in codes:
                message = cause.message.strip()
                message = message.split(f"{cause.cls_name}: ", 1)[-1]  # drop the module.Class prefix
                return StageFailed(message, codes[cause.cls_name], error.to_string())
    if step_errors:
        innermost = _errors(step_errors[0])[-1]
        return StageFailed(
            f"{innermost.cls_name}: {innermost.message.strip()} (run {result.run_id[:8]}; --debug shows the traceback)",
            EXIT_FAILED,
            step_errors[0].to_string(),
        )
    messages = [event.message for event in result.all_events if event.is_failure]
    return StageFailed(f"run {result.run_id[:8]} failed: {(messages or ['no failure event'])[-1]}", EXIT_FAILED)


def materialize_all(
    run_config: RunConfig,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    log_level: str = "INFO",
    force: bool = False,
    wait_timeout_s: float | None = None,
    interrupts: Interrupts | None = None,
    debug: bool = False,
    meter: Callable[[str], AbstractContextManager] | None = None,
) -> list:
    """Run what is not up to date (everything with `force`), stage by stage; raises StageFailed
    at the first failed run. Returns the execution results (empty when all was up to date).
    `meter(run_id)`, when given, wraps each execution (preflight measures them)."""
    for stale in release_stale_runs(instance):
        print(describe_stale(stale), flush=True)
    rerun = failed_blocking_checks(defs, instance)
    plan = stale_plan(defs, instance, force, rerun)
    # partitions Dagster counts as fresh but whose files are gone are extracted again
    activations = dg.AssetKey("activations")
    fresh = set(run_config.partition_keys) - set(plan.get(activations) or ())
    if damaged := damaged_partitions(defs.resources["storage"].layout().activation_store(), sorted(fresh), instance):
        for key, reason in damaged.items():
            print(f"activations partition {key} is damaged ({reason}): extracting it again", flush=True)
        rerun.setdefault(activations, set()).update(damaged)
        plan = stale_plan(defs, instance, force, rerun)
    if not plan:
        print(f"nothing to do: every asset of run {run_config.name} is up to date (config {run_config.digest()})")
        return []
    results = []
    ordered = stages(defs)
    for number, stage in enumerate(ordered, start=1):
        label = f"[{number}/{len(ordered)}] {stage.job}"
        runs = stage_runs(stage.assets, plan, defs)
        if not runs:
            print(f"{label} ({', '.join(stage.assets)}): up to date", flush=True)
            continue
        print(f"{label}: {'; '.join(_describe(r) for r in runs)} ...", flush=True)
        started = time.perf_counter()
        for stage_run in runs:
            tags = process_tags()
            if stage_run.partitions:
                first, last = stage_run.partitions
                tags |= {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}
            pools = {defs.resolve_assets_def(name).op.pool for name in stage_run.assets} - {None}
            wait_for_pools(instance, pools, wait_timeout_s, lambda line: print(line, flush=True))
            run_id = make_new_run_id()
            if interrupts is not None:
                interrupts.run_id = run_id
            with meter(run_id) if meter else nullcontext():
                result = defs.resolve_job_def(stage.job).execute_in_process(
                    instance=instance,
                    run_id=run_id,
                    asset_selection=[dg.AssetKey(name) for name in stage_run.assets],
                    tags=tags,
                    run_config={"loggers": {"console": {"config": {"log_level": log_level, "tracebacks": debug}}}},
                    raise_on_error=False,
                )
            if interrupts is not None:
                interrupts.run_id = None  # finished: an interrupt now has no run to mark
            if not result.success:
                raise failure(result)
            results.append(result)
        print(f"{label}: done in {time.perf_counter() - started:.0f}s", flush=True)
    return results


def export_dictionary(run_config: RunConfig, data_root: str, name: str, out: Path | None) -> str:
    """Write one dictionary of a finished run as an SAELens SAE folder; returns what to tell the user."""
    from gemma_assets.core import interop
    from gemma_assets.core.layout import find_member
    from gemma_assets.core.report import git_revision
    from gemma_assets.defs.resources import RunResource, StorageResource

    layout = StorageResource(data_root=data_root, run=RunResource.of(run_config)).layout()
    member = find_member(layout, run_config, name)
    corpus = run_config.corpus
    metadata = {
        "model_name": run_config.model.name,
        "hook_name": run_config.model.hook_name,
        "hook_layer": run_config.model.layer,
        "context_size": run_config.sampling.context_len,
        "prepend_bos": True,
        "dataset_path": corpus.dataset or ", ".join(corpus.data_files) or "offline Pile-format corpus",
        "gemma_assets": {
            "run": run_config.name,
            "config_digest": run_config.digest(),
            "dictionary": member.name,
            "family": member.family.label(member.dictionary.n_features),
            "preprocessing": run_config.clustering.preprocessing,
            "train_partitions": run_config.train_partition_keys,
            "git_revision": git_revision(),
        },
    }
    folder = interop.export(member.dictionary, out or layout.export_dir(member.name), metadata)
    return (
        f"exported {member.name} ({member.family.label(member.dictionary.n_features)}) to {folder}\n"
        f"load it with: import gemma_assets.core.interop; from sae_lens import SAE; SAE.load_from_disk({str(folder)!r})"
    )


def verify_report(report_dir: Path, data_root: str, device: str) -> str:
    """Recompute a report's held-out FVU, L0 and spliced CE here and print each beside the report's;
    returns the closing line, or raises StageFailed when a figure differs beyond its tolerance."""
    from gemma_assets.core import model, verification
    from gemma_assets.core.environment import describe, numeric_environment
    from gemma_assets.defs.resources import ComputeResource

    report = verification.ReportToVerify.open(report_dir, data_root)
    run, layout, dtype = report.run, report.layout, report.forward_dtype
    compute = ComputeResource(device=device)
    here = numeric_environment(
        compute.resolved_device, dtype, compute.comoment_precision(run.quality.comoment_precision)
    )
    print(f"report {report_dir} (run {run.name}) was computed in: {describe(report.figures['numeric_environment'])}")
    print(f"recomputing in: {describe(here)}", flush=True)

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    members = layout.clustering_members(run) + layout.sae_members(run.sae_specs, compute.resolved_device)
    lm = model.load_model(layout.model_source(run), run.model.layer, compute.resolved_device, dtype)
    recomputed = verification.recompute(report, members, lm, compute.resolved_device, log)
    agreements = verification.compare(report.reported(), recomputed, dtype, report.predictions)
    print(verification.table(agreements))
    differing = [a for a in agreements if not a.agrees]
    if differing:
        first = differing[0]
        raise StageFailed(
            f"{len(differing)} of {len(agreements)} figures differ from the report beyond their tolerance (first: "
            f"{first.figure} of {first.dictionary}, {first.reported:.8g} reported, {first.recomputed:.8g} here) -> "
            "the data root may not hold the activations and dictionaries this report was computed from; "
            "rematerialise the run, or compare the two numeric environments printed above",
            EXIT_DISAGREES,
        )
    return f"all {len(agreements)} figures agree with the report within their tolerances (docs/reproducibility.md)"


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
    export = commands.add_parser("export", help="write a dictionary of a finished run as an SAELens SAE folder")
    export.add_argument("dictionary", metavar="DICTIONARY_NAME", help="as the report names it, e.g. kmeans-256")
    export.add_argument("--out", type=Path, help="folder to write (default: DATA_ROOT/RUN/exports/DICTIONARY_NAME)")
    verify = commands.add_parser(
        "verify-report",
        help="recompute a report's held-out FVU, L0 and spliced CE here and hold them against the report",
    )
    verify.add_argument("report_dir", type=Path, metavar="REPORT_DIR", help="the folder of report.md and report.json")
    verify.add_argument(
        "--data-root", help=f"where the report's run is stored (default: ${DATA_ROOT_ENV_VAR} or ./data)"
    )
    verify.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    preflight = commands.add_parser(
        "preflight",
        help="run the whole graph on small slices of the config, measure every asset, estimate the full run",
    )
    preflight.add_argument("--json", type=Path, metavar="PATH", help="also write the measurements and estimate as JSON")
    preflight.add_argument(
        "--points",
        type=int,
        default=2,
        choices=[1, 2, 3],
        help="slices to measure, each with more windows (2: fixed costs such as model loads are told apart "
        "from per-token ones; 1: faster, the estimate is an upper bound)",
    )
    preflight.add_argument(
        "--windows",
        type=int,
        metavar="N",
        help="windows per partition of the first slice (default: enough for the largest k)",
    )
    preflight.add_argument(
        "--offline-standins",
        action="store_true",
        help="rehearse google/gemma-2-2b with Gemma Scope offline: build stand-ins in the real layouts in a "
        "Hugging Face cache under DATA_ROOT/standins and run with HF_HUB_OFFLINE=1",
    )
    for command in (run, ui, validate, export, preflight):
        _add_config_arguments(command)
    _add_config_arguments(show, data_root=False)
    run.add_argument("--force", action="store_true", help="recompute everything, even what is up to date")
    for command, level in ((run, "INFO"), (preflight, "WARNING")):
        command.add_argument(
            "--log-level",
            default=level,
            type=str.upper,
            choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
            help="Dagster console log level (DEBUG shows per-batch progress)",
        )
    run.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up when a pool slot (the GPU) stays held by another live run this long (default: wait)",
    )
    for command in (run, preflight):
        command.add_argument("--debug", action="store_true", help="print the traceback behind a failure")
    return parser


def _fail(message: str, code: int) -> None:
    print(f"gemma-assets: error: {message}", file=sys.stderr)
    sys.exit(code)


def _data_root(args: argparse.Namespace) -> str:
    """The data root (--data-root, then $GEMMA_ASSETS_DATA_ROOT, then ./data), never empty."""
    if args.data_root is not None:
        if not args.data_root.strip():
            raise ConfigError("--data-root is empty: pass a folder, or leave the option out to use ./data")
        os.environ[DATA_ROOT_ENV_VAR] = str(Path(args.data_root).expanduser().resolve())
    elif DATA_ROOT_ENV_VAR in os.environ and not os.environ[DATA_ROOT_ENV_VAR].strip():
        raise ConfigError(f"${DATA_ROOT_ENV_VAR} is set but empty: set it to a folder, or unset it to use ./data")
    return str(Path(default_data_root()).expanduser().resolve())


def _writable(data_root: str, run_config: RunConfig) -> None:
    folder = RunLayout.of(data_root, run_config.name).root
    if problem := writable_folder(folder):
        raise ConfigError(
            f"the data root {data_root} cannot hold outputs ({folder}: {problem}) -> pass --data-root with a "
            f"writable folder, or set ${DATA_ROOT_ENV_VAR}"
        )


def _preflight(args: argparse.Namespace, run_config: RunConfig, data_root: Path) -> None:
    from gemma_assets import preflight

    if args.offline_standins:
        from gemma_assets.core import standins

        location = standins.location(data_root, run_config)  # refuses other models before touching the environment
        os.environ.update(location.environment())  # before the hub client is first imported
        run_config = standins.rehearsal_config(run_config, standins.build(location, run_config))
    _writable(str(data_root / "preflight"), run_config)
    try:
        preflight.preflight(run_config, data_root, args.points, args.windows, args.json, args.log_level, args.debug)
    except StageFailed as error:
        if args.debug and error.details:
            print(error.details, file=sys.stderr)
        _fail(f"preflight: {error}", error.code)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "config" and args.action == "reference":
        print(reference_markdown(), end="")
        return
    if args.command == "verify-report":
        try:
            print(verify_report(args.report_dir, _data_root(args), args.device))
        except (ConfigError, ModelAccessError, StorageError) as error:
            _fail(str(error), KNOWN_ERRORS[type(error)])
        except StageFailed as error:
            _fail(str(error), error.code)
        return
    try:
        run_config = load_run_config(args.config, args.overrides)
        if args.command == "config" and args.action == "show":
            print(f"# run config {run_config.name}, digest {run_config.digest()}")
            print(run_config.to_yaml(), end="")
            return
        data_root = _data_root(args)
        if args.command == "ui":
            _writable(data_root, run_config)
            # the code location reads the resolved file, so the UI shows exactly this config
            resolved = save_resolved(run_config, RunLayout.of(data_root, run_config.name).resolved_config_file)
            os.environ[CONFIG_ENV_VAR] = str(resolved)
            ensure_dagster_home()
            sys.exit(subprocess.call(["dagster", "dev", "-w", "workspace.yaml"]))
        if args.command == "export":
            print(export_dictionary(run_config, data_root, args.dictionary, args.out))
            return
        if args.command == "preflight":
            _preflight(args, run_config, Path(data_root))
            return
        from gemma_assets.core.validation import validate_run

        architecture = validate_run(run_config, RunLayout.of(data_root, run_config.name).models_dir)
        if args.command == "materialize":
            _writable(data_root, run_config)
    except (ConfigError, ModelAccessError, CorpusError, StorageError) as error:
        _fail(str(error), KNOWN_ERRORS[type(error)])
    except FileNotFoundError as error:  # a dictionary of a run that has not been materialised
        _fail(str(error), EXIT_STORAGE)
    if args.command == "config":
        print(
            f"run config {run_config.name} is valid (digest {run_config.digest()}): {run_config.model.name}, "
            f"block {run_config.model.layer} of {architecture.n_layers}, d_model {architecture.d_model}; "
            f"{run_config.sampling.partitions} partitions of {run_config.sampling.windows_per_partition} windows x "
            f"{run_config.sampling.context_len} tokens ({run_config.train_tokens:,} train tokens); k in "
            f"{list(run_config.clustering.ks)}; {len(run_config.sae_specs)} SAEs; outputs in "
            f"{RunLayout.of(data_root, run_config.name).root}"
        )
        return

    from gemma_assets.defs.graph import build_definitions

    home = ensure_dagster_home()
    defs = build_definitions(run_config, data_root)
    save_resolved(run_config, RunLayout.of(data_root, run_config.name).resolved_config_file)
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance, Interrupts(instance) as interrupts:
        try:
            results = materialize_all(
                run_config, defs, instance, args.log_level, args.force, args.wait_timeout, interrupts, args.debug
            )
        except StageFailed as error:
            if args.debug and error.details:
                print(error.details, file=sys.stderr)
            _fail(str(error), error.code)
        except PoolWaitTimeout as error:
            _fail(str(error), EXIT_POOL_TIMEOUT)
    layout = defs.resources["storage"].layout()
    if results:
        print(
            f"\nall stages done in {time.perf_counter() - started:.0f}s (run {run_config.name}; runs recorded in {home})"
        )
    print(f"report: {layout.report_file('report.md')}")


if __name__ == "__main__":
    # `python -m gemma_assets.cli` runs this file as __main__, a second copy beside the
    # gemma_assets.cli that preflight imports: run that module's main, so one StageFailed exists
    from gemma_assets.cli import main as package_main

    package_main()

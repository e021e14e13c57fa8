"""Materialise a run config's graph through Dagster, stage by stage, running only what is not
up to date."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import dagster as dg

from gemma_assets.core.config import RunConfig
from gemma_assets.core.storage import ActivationStore, StorageError
from gemma_assets.dagster_private import make_new_run_id
from gemma_assets.defs.common import progress_every_s
from gemma_assets.defs.operations import PARTITION_RANGE_END_TAG, PARTITION_RANGE_START_TAG
from gemma_assets.defs.recovery import describe_stale, process_tags, release_stale_runs, wait_for_pools
from gemma_assets.defs.resources import run_layout
from gemma_assets.runner.errors import failure
from gemma_assets.runner.interrupts import Interrupts
from gemma_assets.runner.planning import (
    damaged_partitions,
    describe,
    failed_blocking_checks,
    stage_runs,
    stages,
    stale_plan,
)
from gemma_assets.runner.terminal import command_line_progress


def ensure_dagster_home() -> Path:
    """$DAGSTER_HOME, defaulting to ./.dagster_home seeded with the project's dagster.yaml."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    project_config = Path.cwd() / "dagster.yaml"
    if not (home / "dagster.yaml").exists() and project_config.exists():
        shutil.copy(project_config, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


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
    activations, store = dg.AssetKey("activations"), run_layout(defs).activation_store()
    fresh = set(run_config.partition_keys) - set(plan.get(activations) or ())
    if damaged := damaged_partitions(store, sorted(fresh), instance):
        for key, reason in damaged.items():
            print(f"activations partition {key} is damaged ({reason}): extracting it again", flush=True)
        rerun.setdefault(activations, set()).update(damaged)
        plan = stale_plan(defs, instance, force, rerun)
    if not plan:
        print(f"nothing to do: every asset of run {run_config.name} is up to date (config {run_config.digest()})")
        return []
    extracted = set(plan.get(activations) or ())
    # what the partitions to extract again hold now: back bit-identical, they feed nothing new below
    before = {} if force else committed_contents(store, extracted)
    results = []
    ordered = stages(defs)
    for number, stage in enumerate(ordered, start=1):
        label = f"[{number}/{len(ordered)}] {stage.job}"
        runs = stage_runs(stage.assets, plan, defs)
        if not runs:
            print(f"{label} ({', '.join(stage.assets)}): up to date", flush=True)
            continue
        print(f"{label}: {'; '.join(describe(r) for r in runs)} ...", flush=True)
        started = time.perf_counter()
        for stage_run in runs:
            tags = process_tags()
            if stage_run.partitions:
                first, last = stage_run.partitions
                tags |= {PARTITION_RANGE_START_TAG: first, PARTITION_RANGE_END_TAG: last}
            pools = {pool for name in stage_run.assets if (pool := defs.resolve_assets_def(name).op.pool) is not None}
            wait_for_pools(instance, pools, wait_timeout_s, lambda line: print(line, flush=True))
            run_id = make_new_run_id()
            if interrupts is not None:
                interrupts.run_id = run_id
            # the console logger prints the run log's progress lines at INFO and below; a bar on a terminal
            shown = command_line_progress(lines=log_level not in ("DEBUG", "INFO"), every_s=progress_every_s())
            with meter(run_id) if meter else nullcontext(), shown:
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
        if activations.to_user_string() in stage.assets and before:
            after = committed_contents(store, before)
            if identical := sorted(key for key, crcs in before.items() if after.get(key) == crcs):
                print(f"activations {', '.join(identical)}: extracted again bit-identical, nothing below reruns")
                # the rest propagates from the partitions that changed or are new, as planned before
                changed: set[str | None] = {key for key in extracted if key not in identical}
                plan = stale_plan(defs, instance, force, {**rerun, activations: changed})
    return results


def committed_contents(store: ActivationStore, keys: Iterable[str]) -> dict[str, dict[str, int]]:
    """The CRC32 of every file of each committed partition among `keys` as its commit recorded
    them (a file deleted or flipped since keeps its recorded CRC); an unreadable commit is left out."""
    contents = {}
    for key in keys:
        try:
            contents[key] = store.manifest(key)["checksums"]
        except StorageError:
            continue
    return contents

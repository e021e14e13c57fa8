"""What must run, and in which executions: stages in dependency order cut where the job
changes, the partitions Dagster does not find fresh, blocking checks that failed and stored
partitions whose files are gone."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import dagster as dg

from gemma_assets.core.storage import ActivationStore, StorageError
from gemma_assets.dagster_private import (
    AssetCheckExecutionRecordStatus,
    AssetGraphView,
    CachingStaleStatusResolver,
    StaleStatus,
    TemporalContext,
    UnresolvedAssetJobDefinition,
)
from gemma_assets.defs.operations import contiguous_ranges


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
    asset_jobs = [job for job in defs.jobs or () if isinstance(job, UnresolvedAssetJobDefinition)]
    job_of = {key: job.name for job in asset_jobs for key in job.selection.resolve(graph)}
    pending, done, result = list(graph.toposorted_asset_keys), set[dg.AssetKey](), []
    while pending:
        job, members = job_of[pending[0]], list[dg.AssetKey]()
        for key in pending:  # toposorted: an asset comes after everything it depends on
            if job_of[key] == job and graph.get(key).parent_keys <= done | set(members):
                members.append(key)
        pending = [key for key in pending if key not in members]
        done |= set(members)
        result.append(Stage(job, [key.to_user_string() for key in members]))
    return result


Plan = dict[dg.AssetKey, list[str] | None]  # asset -> partitions to run (None: unpartitioned)


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
        temporal_context=TemporalContext(effective_dt=datetime.now(timezone.utc), last_event_id=None),
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
        keys = list(node.partitions_def.get_partition_keys())
        # a parent over other partitions (or none) feeds every partition of this asset
        same_partitions = [p for p in planned_parents if graph.get(p).partitions_def == node.partitions_def]
        # a failed check recorded without a partition (a run over many) names no one partition
        if force or len(same_partitions) < len(planned_parents) or None in rerun.get(key, ()):
            wanted = keys
        else:
            from_parents = {partition for parent in same_partitions for partition in plan[parent] or ()}
            from_parents |= {partition for partition in rerun.get(key, ()) if partition is not None}
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


def describe(run: StageRun) -> str:
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

"""Runs whose process died: found, marked failed and their pool slots freed, so a killed run
never blocks the next one.

A run killed with SIGKILL (an out-of-memory kill looks the same) stays STARTED in the instance
and keeps its slot of the `gpu` pool until the daemon's run monitoring notices, and an
in-process run waiting for that slot waits without end. Every run `gemma-assets materialize`
starts carries the host and pid of its process as tags; a STARTED run of this host whose pid
is gone is stale.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable

import dagster as dg

HOST_TAG = "gemma_assets/host"
PID_TAG = "gemma_assets/pid"
UNFINISHED = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


class PoolWaitTimeout(RuntimeError):
    """A pool slot stayed held by a live run for longer than the wait allowed."""


def process_tags() -> dict[str, str]:
    """Tags that let a later command tell whether this run's process is still alive."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _process_gone(run: dg.DagsterRun) -> bool:
    host, pid = run.tags.get(HOST_TAG), run.tags.get(PID_TAG, "")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # not ours to judge: another machine, or a run launched elsewhere
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another user
    return False


def mark_failed(instance: dg.DagsterInstance, run: dg.DagsterRun, reason: str) -> None:
    """Mark a run failed and free the pool slots its steps held."""
    instance.report_run_failed(run, message=reason)
    instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


def release_stale_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Unfinished runs of this host whose process is gone, marked failed (slots freed)."""
    stale = [run for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED)) if _process_gone(run)]
    for run in stale:
        mark_failed(
            instance,
            run,
            f"process {run.tags[PID_TAG]} on {run.tags[HOST_TAG]} is gone (killed?): marked failed by gemma-assets",
        )
    return stale


def describe_stale(run: dg.DagsterRun) -> str:
    return (
        f"released stale run {run.run_id[:8]} (job {run.job_name}, process {run.tags.get(PID_TAG)} gone): "
        "marked failed, its pool slots freed"
    )


def _holders(instance: dg.DagsterInstance, pools: Iterable[str]) -> dict[str, set[str]]:
    """Pools whose every slot is claimed, with the runs holding them."""
    full = {}
    for pool in pools:
        info = instance.event_log_storage.get_concurrency_info(pool)
        if info.limit is not None and len(info.claimed_slots) >= info.limit:
            full[pool] = info.active_run_ids
    return full


def wait_for_pools(
    instance: dg.DagsterInstance,
    pools: Iterable[str],
    timeout_s: float | None,
    say: Callable[[str], None],
    every_s: float = 5.0,
) -> None:
    """Return once every pool has a free slot, releasing stale holders on the way; say which
    live run holds a slot every `every_s` seconds; PoolWaitTimeout after `timeout_s`."""
    pools = sorted(set(pools))
    started, last_said = time.monotonic(), float("-inf")
    while True:
        for run in release_stale_runs(instance):
            say(describe_stale(run))
        full = _holders(instance, pools)
        if not full:
            return
        waited = time.monotonic() - started
        held = "; ".join(
            f"pool '{pool}' held by run{'s' if len(runs) > 1 else ''} "
            + ", ".join(_run_line(instance, run_id) for run_id in sorted(runs))
            for pool, runs in full.items()
        )
        if timeout_s is not None and waited >= timeout_s:
            raise PoolWaitTimeout(
                f"{held}, still after {waited:.0f}s -> wait for it, cancel it (UI, or `dagster run delete -f RUN_ID`), "
                "raise --wait-timeout, or raise the pool's limit (`dagster instance concurrency set gpu 2`)"
            )
        if time.monotonic() - last_said >= every_s:
            say(f"waiting for a free slot: {held} ({waited:.0f}s)")
            last_said = time.monotonic()
        time.sleep(0.5)


def _run_line(instance: dg.DagsterInstance, run_id: str) -> str:
    run = instance.get_run_by_id(run_id)
    if run is None:
        return run_id[:8]
    where = f"pid {run.tags[PID_TAG]} on {run.tags[HOST_TAG]}" if PID_TAG in run.tags else "launched elsewhere"
    return f"{run_id[:8]} (job {run.job_name}, {run.status.value}, {where})"

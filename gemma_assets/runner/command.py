"""The `materialize` command's body: check the run, its data root and the free space, take the
run's lock, then run every stale stage; a full disk anywhere ends in one message that names the
data root, its free space and what the run needs."""

from __future__ import annotations

import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass

import dagster as dg

from gemma_assets.core import costs
from gemma_assets.core.config import ConfigError, RunConfig, save_resolved
from gemma_assets.core.layout import RunLayout
from gemma_assets.defs.resources import require_writable, run_layout
from gemma_assets.runner.errors import DiskFull, disk_full, is_enospc, short_of_space
from gemma_assets.runner.execution import ensure_dagster_home, materialize_all
from gemma_assets.runner.interrupts import Interrupts
from gemma_assets.runner.lock import remote_run_lock, run_lock


@dataclass(frozen=True)
class MaterializeOptions:
    log_level: str
    force: bool  # recompute what is up to date
    wait_timeout: float | None  # for a pool slot held by another live run (None: wait)
    debug: bool
    ignore_free_space: bool  # start even when the free space is below the estimate
    wait: bool  # for another live materialize of the run (False: stop, naming it)
    bucket_lock: bool  # on an s3:// data root, also hold the run's lock on the bucket


def materialize(run_config: RunConfig, data_root: str, options: MaterializeOptions) -> None:
    from gemma_assets.core.validation import validate_run

    layout = RunLayout.of(data_root, run_config.name)
    architecture = validate_run(run_config, layout.models_dir)

    def need() -> costs.DiskNeed:  # what the run still needs: less what its folder holds now
        return costs.disk_need(run_config, architecture.d_model, layout.root, layout.models_dir)

    # the disk this machine writes: the data root, or the working copy of a URL data root (the
    # bulk, the activations, goes to the remote, which has no free space to check)
    disk = str(layout.root.parent) if layout.remote else data_root
    try:
        require_writable(data_root, run_config)  # first: an unwritable data root is a bad option (2), not a full disk
        if not options.ignore_free_space and not layout.remote and (refusal := short_of_space(disk, need())):
            raise refusal  # before the lock: a refused command writes nothing
        with (
            run_lock(layout.root, run_config.name, options.wait, _say),
            remote_run_lock(layout.remote, run_config.name, options.wait, _say)
            if layout.remote and options.bucket_lock
            else nullcontext(),
        ):
            _run_stages(run_config, data_root, options)
    except DiskFull as error:  # a step's ENOSPC: say where, how much is free and what the run needs
        raise disk_full(error.cause, disk, need(), error.details) from None
    except (OSError, ConfigError) as error:  # the command's own writes: the probe, the resolved config, ...
        if not is_enospc(error):
            raise
        raise disk_full(f"{type(error).__name__}: {error}", disk, need(), traceback.format_exc()) from None


def _say(line: str) -> None:
    print(line, flush=True)


def _run_stages(run_config: RunConfig, data_root: str, options: MaterializeOptions) -> None:
    from gemma_assets.defs.graph import build_definitions

    home = ensure_dagster_home()
    defs = build_definitions(run_config, data_root)
    save_resolved(run_config, RunLayout.of(data_root, run_config.name).resolved_config_file)
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance, Interrupts(instance) as interrupts:
        results = materialize_all(
            run_config,
            defs,
            instance,
            options.log_level,
            options.force,
            options.wait_timeout,
            interrupts,
            options.debug,
        )
    if results:
        print(
            f"\nall stages done in {time.perf_counter() - started:.0f}s (run {run_config.name}; runs recorded in {home})"
        )
    print(f"report: {run_layout(defs).report_file('report.md')}")

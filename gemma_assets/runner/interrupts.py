"""Ctrl-C and SIGTERM while a stage runs."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import dagster as dg

from gemma_assets.dagster_private import check_captured_interrupt
from gemma_assets.defs.recovery import mark_failed
from gemma_assets.runner.errors import EXIT_INTERRUPTED


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
        where = f": run {run.run_id[:8]} marked failed" if run is not None else ""
        print(f"\ngemma-assets: interrupted by {name}{where}; run the same command again to continue", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)  # without unwinding: Dagster would hold the exit for its cleanup

"""How a run fails, as users read it: one exit code per kind of known failure, and StageFailed
carrying the cause and its fix (the last line printed) with the traceback kept for --debug."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import TYPE_CHECKING

from gemma_assets.core import costs
from gemma_assets.core.config import ConfigError
from gemma_assets.core.corpus import CorpusError
from gemma_assets.core.model import ModelAccessError
from gemma_assets.core.storage import StorageError
from gemma_assets.defs.recovery import PoolWaitTimeout
from gemma_assets.runner.lock import RunBusy

if TYPE_CHECKING:
    from dagster_shared.error import SerializableErrorInfo

# Exit codes, one per kind of known failure; the cause and its fix are the last line printed.
EXIT_FAILED = 1  # a step failed for a reason the project does not know
EXIT_CONFIG = 2  # the run config or the data root is invalid (argparse uses 2 for bad arguments too)
EXIT_MODEL_ACCESS = 3  # the model (or its config) cannot be reached
EXIT_STORAGE = 4  # stored data is missing or corrupt
EXIT_CORPUS = 5  # the corpus cannot be read
EXIT_CHECK = 6  # a blocking data-quality check failed
EXIT_POOL_TIMEOUT = 7  # a pool slot stayed held by a live run past --wait-timeout
EXIT_DISAGREES = 8  # verify-report: a recomputed figure differs from its report beyond its tolerance
# the disk is full (ENOSPC, in a step or in the command itself), or materialize found less free
# space on the data root than the run still needs; finished work is kept, the same command continues
EXIT_DISK_FULL = 9
EXIT_BUSY = 10  # materialize --no-wait: another live command is materialising the run
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM
KNOWN_ERRORS = {
    ConfigError: EXIT_CONFIG,
    ModelAccessError: EXIT_MODEL_ACCESS,
    StorageError: EXIT_STORAGE,
    CorpusError: EXIT_CORPUS,
    PoolWaitTimeout: EXIT_POOL_TIMEOUT,
    RunBusy: EXIT_BUSY,
}


class StageFailed(Exception):
    """A stage's run failed; `code` says how (one of the EXIT_ codes), the message why and the fix."""

    def __init__(self, message: str, code: int, details: str = "") -> None:
        super().__init__(message)
        self.code, self.details = code, details


class DiskFull(StageFailed):
    """The disk ran full (ENOSPC); `cause` names the step or the write and the error it raised."""

    def __init__(self, message: str, cause: str, details: str = "") -> None:
        super().__init__(message, EXIT_DISK_FULL, details)
        self.cause = cause


# how ENOSPC reads in an error's message: Python's OSError, Rust's io::Error (safetensors), and
# the strerror that libraries (pyarrow, zarr, numcodecs) repeat when they wrap it
ENOSPC_MARKERS = (f"[Errno {errno.ENOSPC}]", f"os error {errno.ENOSPC}", "No space left on device")
DISK_FULL_FIX = "then run the same command again: finished work is kept"


def is_enospc(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is ENOSPC."""
    current: BaseException | None = error
    for _ in range(16):  # a chain, not a cycle
        if current is None:
            return False
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        if any(marker in str(current) for marker in ENOSPC_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full(
    cause: str, data_root: str | None = None, need: costs.DiskNeed | None = None, details: str = ""
) -> DiskFull:
    """The last line of a full disk: the data root, the free space on its filesystem and what the
    run needs (when known), what ran out, and the fix."""
    if data_root is None:
        return DiskFull(
            f"no space left on device ({cause}) -> free space on the data root's disk or point --data-root at a "
            f"larger one, {DISK_FULL_FIX}",
            cause,
            details,
        )
    free = costs.format_bytes(costs.free_bytes(Path(data_root)))
    needs = f", and the run needs {need.describe()}" if need is not None else ""
    return DiskFull(
        f"no space left on device ({cause}): the data root {data_root} has {free} free on its filesystem{needs} "
        f"-> free space there or point --data-root at a larger disk, {DISK_FULL_FIX}",
        cause,
        details,
    )


def short_of_space(data_root: str, need: costs.DiskNeed) -> StageFailed | None:
    """Refusal to start a run on a data root with less free space than the run still needs."""
    free = costs.free_bytes(Path(data_root))
    if free >= need.remaining:
        return None
    return StageFailed(
        f"the data root {data_root} has {costs.format_bytes(free)} free on its filesystem, less than the run "
        f"needs: {need.describe()} -> free space there or point --data-root at a larger disk and run the same "
        "command again (finished work is kept), or pass --ignore-free-space to start anyway",
        EXIT_DISK_FULL,
    )


def _errors(error: SerializableErrorInfo | None) -> list[SerializableErrorInfo]:
    """A serialised error and its causes, outermost first."""
    chain: list[SerializableErrorInfo] = []
    while error is not None and len(chain) < 16:
        chain.append(error)
        error = error.cause or error.context
    return chain


def _failed_steps(result) -> list[tuple[str | None, SerializableErrorInfo]]:
    """(step key, error) of every failed step of a run, in order."""
    return [
        (event.step_key, event.step_failure_data.error)
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error
    ]


def _message(cause: SerializableErrorInfo) -> str:
    return cause.message.strip().split(f"{cause.cls_name}: ", 1)[-1]  # drop the module.Class prefix


def _disk_full_step(run_id: str, failed_steps: list[tuple[str | None, SerializableErrorInfo]]) -> DiskFull | None:
    """The first failed step whose error, or an error it was raised from, is ENOSPC."""
    for step_key, error in failed_steps:
        full = [link for link in _errors(error) if any(marker in link.message for marker in ENOSPC_MARKERS)]
        if full:
            where = f"step {step_key} of run {run_id[:8]}: {full[-1].cls_name}: {_message(full[-1])}"
            return disk_full(where, details=error.to_string())
    return None


def failure(result) -> StageFailed:
    """The cause of a failed run, as users should read it: a full disk (ENOSPC anywhere in any
    step's errors: it explains whatever else failed), a failed blocking check's description, or
    the message of the project error behind a step failure; the stack trace goes to details."""
    failed_steps = _failed_steps(result)
    if full := _disk_full_step(result.run_id, failed_steps):
        return full
    failed_checks = [e for e in result.get_asset_check_evaluations() if not e.passed and e.blocking]
    if failed_checks:
        check = failed_checks[0]
        where = check.asset_key.to_user_string() + (f"[{check.partition}]" if check.partition else "")
        return StageFailed(f"blocking check {check.check_name} failed on {where}: {check.description}", EXIT_CHECK)
    codes = {cls.__name__: code for cls, code in KNOWN_ERRORS.items()}
    step_errors = [error for _, error in failed_steps]
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
                return StageFailed(_message(cause), codes[cause.cls_name], error.to_string())
    if step_errors:
        innermost = _errors(step_errors[0])[-1]
        return StageFailed(
            f"{innermost.cls_name}: {innermost.message.strip()} (run {result.run_id[:8]}; --debug shows the traceback)",
            EXIT_FAILED,
            step_errors[0].to_string(),
        )
    messages = [event.message for event in result.all_events if event.is_failure]
    return StageFailed(f"run {result.run_id[:8]} failed: {(messages or ['no failure event'])[-1]}", EXIT_FAILED)

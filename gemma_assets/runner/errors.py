"""How a run fails, as users read it: one exit code per kind of known failure, and StageFailed
carrying the cause and its fix (the last line printed) with the traceback kept for --debug."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gemma_assets.core.config import ConfigError
from gemma_assets.core.corpus import CorpusError
from gemma_assets.core.model import ModelAccessError
from gemma_assets.core.storage import StorageError
from gemma_assets.defs.recovery import PoolWaitTimeout

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


def _errors(error: SerializableErrorInfo | None) -> list[SerializableErrorInfo]:
    """A serialised error and its causes, outermost first."""
    chain: list[SerializableErrorInfo] = []
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

"""Running a run config's graph from the command line: planning what is stale, executing it
stage by stage through Dagster, interrupts, and the exit code of each known failure."""

from gemma_assets.runner.errors import (
    EXIT_BUSY,
    EXIT_CHECK,
    EXIT_CONFIG,
    EXIT_CORPUS,
    EXIT_DISAGREES,
    EXIT_DISK_FULL,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MODEL_ACCESS,
    EXIT_POOL_TIMEOUT,
    EXIT_STORAGE,
    KNOWN_ERRORS,
    StageFailed,
    failure,
)
from gemma_assets.runner.execution import ensure_dagster_home, materialize_all
from gemma_assets.runner.interrupts import Interrupts
from gemma_assets.runner.planning import failed_blocking_checks, stale_plan

__all__ = [
    "EXIT_BUSY",
    "EXIT_CHECK",
    "EXIT_CONFIG",
    "EXIT_CORPUS",
    "EXIT_DISAGREES",
    "EXIT_DISK_FULL",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_MODEL_ACCESS",
    "EXIT_POOL_TIMEOUT",
    "EXIT_STORAGE",
    "KNOWN_ERRORS",
    "Interrupts",
    "StageFailed",
    "ensure_dagster_home",
    "failed_blocking_checks",
    "failure",
    "materialize_all",
    "stale_plan",
]

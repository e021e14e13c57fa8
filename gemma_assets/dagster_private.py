"""Every private Dagster name the project uses, in one place (Dagster offers no public API for
these); test_dagster_private imports each and fails, naming it, when a Dagster release moves it.

- the stale-status resolver behind the UI's "stale" markers, which the runner plans from;
- check execution records, to find the latest failed evaluation of a blocking check;
- the target materialisation of a check evaluation, which makes a per-partition evaluation
  current in the UI;
- interrupt capture, which Dagster installs while a run executes in process;
- Dagster's console logger factory, wrapped by the project's console logger;
- the class of `define_asset_job`'s jobs, whose asset selection the runner plans stages from.

The run tags of a partition range are public strings (`defs.operations`); the test checks that
they still equal Dagster's own constants."""

from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.utils import coerce_valid_log_level, make_new_run_id
from dagster._utils.interrupts import check_captured_interrupt
from dagster._utils.log import create_console_logger

__all__ = [
    "AssetCheckEvaluationTargetMaterializationData",
    "AssetCheckExecutionRecordStatus",
    "AssetGraphView",
    "CachingStaleStatusResolver",
    "StaleStatus",
    "TemporalContext",
    "UnresolvedAssetJobDefinition",
    "check_captured_interrupt",
    "coerce_valid_log_level",
    "create_console_logger",
    "make_new_run_id",
]

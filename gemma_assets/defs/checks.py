"""Check reports of `core` turned into Dagster check results: one function for whole-asset
checks, one for checks judged partition by partition."""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from gemma_assets.core.records import CheckReport, Markdown


def metadata_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """Markdown text shown rendered; numbers and plain text as they are."""
    return {
        name: dg.MetadataValue.md(value) if isinstance(value, Markdown) else value for name, value in values.items()
    }


def check_result(
    report: CheckReport, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=report.passed, severity=severity, description=report.description, metadata=metadata_of(report.metadata)
    )


def _latest_materialization(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1
    ).records
    if not records:
        return None
    latest = records[0]
    return AssetCheckEvaluationTargetMaterializationData(
        storage_id=latest.storage_id, run_id=latest.run_id, timestamp=latest.timestamp
    )


def per_partition(
    context: dg.AssetCheckExecutionContext, judge: Callable[[str], CheckReport]
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    """One evaluation per partition of the run, so each partition shows its own result, also
    when one run materialises a range (an AssetCheckResult would be recorded for no partition,
    and every partition of the range would read "Skipped"). Each evaluation targets the
    partition's latest materialisation, which is what makes it current in the UI."""
    spec = context.check_specs[0]
    for key in context.partition_keys:
        report = judge(key)
        yield dg.AssetCheckEvaluation(
            asset_key=spec.asset_key,
            check_name=spec.name,
            partition=key,
            passed=report.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            blocking=spec.blocking,
            description=report.description,
            metadata=metadata_of(report.metadata),
            target_materialization_data=_latest_materialization(context.instance, spec.asset_key, key),
        )
    yield dg.Output(None)  # the check step's own output

"""Check reports of `core` turned into Dagster check results: one function for whole-asset
checks, one for checks judged partition by partition."""

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import dagster as dg

from gemma_assets.core.records import CheckReport, Markdown
from gemma_assets.core.report import markdown_table
from gemma_assets.dagster_private import AssetCheckEvaluationTargetMaterializationData

FINDING_COLUMNS = ("partition", "row", "position", "dim", "message", "fix")


def metadata_of(report: CheckReport) -> dict[str, Any]:
    """The report's figures (markdown shown rendered) and, when it found problems, where each is."""
    values: Mapping[str, Any] = report.metadata
    metadata = {name: dg.MetadataValue.md(v) if isinstance(v, Markdown) else v for name, v in values.items()}
    if report.findings:
        rows = [dataclasses.asdict(finding) for finding in report.findings[:50]]
        metadata["findings"] = dg.MetadataValue.md(markdown_table(rows, FINDING_COLUMNS))
    return metadata


def check_result(
    report: CheckReport, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=report.passed, severity=severity, description=report.description, metadata=metadata_of(report)
    )


def _latest_materialization(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str
) -> AssetCheckEvaluationTargetMaterializationData | None:
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
            metadata=metadata_of(report),
            target_materialization_data=_latest_materialization(context.instance, spec.asset_key, key),
        )
    yield dg.Output(None)  # the check step's own output

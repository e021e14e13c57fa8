"""Operations: nightly extraction of missing partitions, automation of downstream assets, run
retry tags, and alerts for failed asset checks (blocking or not)."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Literal

import dagster as dg

from gemma_assets.dagster_private import coerce_valid_log_level, create_console_logger
from gemma_assets.defs.resources import ALERT_WEBHOOK_ENV_VAR, OperationsResource

# the run tags that make one run materialise a range of partitions (one model load)
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"

# Run retries (dagster.yaml `run_retries`) apply to every job. Extraction and k-means are long
# GPU runs whose failures are mostly transient (preempted node, lost container, CUDA OOM on a
# shared GPU), so they get the retries explicitly, also on instances with another default.
TRANSIENT_RETRY_TAGS = {"dagster/max_retries": "2"}
# `analyse` fails mostly on its blocking data checks, which a rerun cannot fix: retry it only
# when the run worker itself died, not when an asset or check step failed.
CRASH_ONLY_RETRY_TAGS = {"dagster/retry_on_asset_or_op_failure": "false"}


def contiguous_ranges(keys: Sequence[str], order: Sequence[str], max_len: int | None = None) -> list[tuple[str, str]]:
    """(first, last) of each run of `keys` that is contiguous in the partition order `order`,
    at most `max_len` keys each."""
    position = {key: index for index, key in enumerate(order)}
    ranges: list[list[str]] = []
    for key in sorted(keys, key=position.__getitem__):
        last = ranges[-1] if ranges else None
        if (
            last
            and position[key] == position[last[1]] + 1
            and position[key] - position[last[0]] < (max_len or len(order))
        ):
            last[1] = key
        else:
            ranges.append([key, key])
    return [(first, last) for first, last in ranges]


def missing_partitions(
    instance: dg.DagsterInstance, activations: dg.AssetsDefinition
) -> tuple[list[str], list[str], set[str]]:
    """(every partition key, those neither materialised nor in progress, those in progress)."""
    partitions_def = activations.partitions_def
    if partitions_def is None:
        raise ValueError(f"{activations.key.to_user_string()} is not partitioned")
    keys = list(partitions_def.get_partition_keys(dynamic_partitions_store=instance))
    done = instance.get_materialized_partitions(activations.key)
    status = instance.get_status_by_partition(activations.key, keys, partitions_def) or {}
    running = {key for key, state in status.items() if state == dg.AssetPartitionStatus.IN_PROGRESS}
    return keys, [key for key in keys if key not in done and key not in running], running


def nightly_requests(
    context: dg.ScheduleEvaluationContext, activations: dg.AssetsDefinition, operations: OperationsResource
) -> list[dg.RunRequest] | dg.SkipReason:
    """Run requests for the missing activation partitions, at most `partitions_per_night`, one
    per contiguous range of at most `partitions_per_run` (0: unsplit)."""
    instance = context.instance
    upstream = sorted(set(activations.dependency_keys) - set(activations.keys), key=str)
    unready = [key.to_user_string() for key in upstream if not instance.fetch_materializations(key, limit=1).records]
    if unready:
        return dg.SkipReason(f"upstream not materialised yet: {', '.join(unready)}")
    keys, missing, running = missing_partitions(instance, activations)
    if not missing:
        in_progress = f" or in progress ({len(running)})" if running else ""
        return dg.SkipReason(f"all {len(keys)} activation partitions materialised{in_progress}")
    wanted = missing[: operations.partitions_per_night]
    context.log.info(f"requesting {len(wanted)} of {len(missing)} missing activation partitions")
    # a schedule's run_key is scoped to its tick: it only dedupes a re-evaluated tick
    return [
        dg.RunRequest(
            run_key=f"activations-{first}-{last}",
            tags={PARTITION_RANGE_START_TAG: first, PARTITION_RANGE_END_TAG: last},
        )
        for first, last in contiguous_ranges(wanted, keys, operations.partitions_per_run or None)
    ]


def build_extraction_schedule(
    activations: dg.AssetsDefinition, job_name: str = "extract_activations", cron_schedule: str = "0 2 * * *"
) -> dg.ScheduleDefinition:
    """Each night, request the activation partitions that are neither materialised nor in
    progress (limits: the `operations` resource). One run per contiguous range (the asset is
    BackfillPolicy.single_run, so a range loads the model once); a failed run does not hold
    back the others and is retried by run retries, then asked for again the next night."""
    if activations.partitions_def is None:
        raise ValueError(f"{activations.key.to_user_string()} is not partitioned")

    @dg.schedule(
        name="nightly_activations",
        cron_schedule=cron_schedule,
        job_name=job_name,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Extract the missing activation partitions (at most operations.partitions_per_night "
        "a night), one run per contiguous range.",
    )
    def nightly_activations(context: dg.ScheduleEvaluationContext, operations: OperationsResource):
        return nightly_requests(context, activations, operations)

    return nightly_activations


# Dagster 1.13 adds `default_automation_condition_sensor` only in the STOPPED state; declaring
# it RUNNING lets the eager conditions of the downstream assets act as soon as the daemon runs.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "default_automation_condition_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
)


def failed_check_evaluations(instance: dg.DagsterInstance, run_id: str) -> list[dg.AssetCheckEvaluation]:
    entries = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    evaluations = [entry.asset_check_evaluation for entry in entries]
    return [evaluation for evaluation in evaluations if evaluation is not None and not evaluation.passed]


def alert_text(failures: Sequence[tuple[str, dg.AssetCheckEvaluation]], max_lines: int = 20) -> str:
    """Slack-style text: one line per failure naming asset, check, partition and the check's
    description (our checks put the fix there)."""
    lines = [f":rotating_light: gemma_assets: {len(failures)} asset check(s) failed"]
    for run_id, evaluation in failures[:max_lines]:
        where = f"{evaluation.asset_key.to_user_string()} / {evaluation.check_name}"
        if evaluation.partition:
            where += f" (partition {evaluation.partition})"
        kind = "blocking" if evaluation.blocking else "non-blocking"
        lines.append(
            f"• {where} [{evaluation.severity.value}, {kind}, run {run_id[:8]}]: "
            f"{evaluation.description or 'no description'}"
        )
    if len(failures) > max_lines:
        lines.append(f"… and {len(failures) - max_lines} more (see the Dagster UI)")
    return "\n".join(lines)


def post_alert(url: str, text: str, timeout: float = 10.0) -> None:
    """POST Slack-compatible JSON ({"text": ...}) to an incoming-webhook URL."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"{ALERT_WEBHOOK_ENV_VAR} is not an http(s) URL")
    request = urllib.request.Request(
        url,
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def delivery_error(error: Exception) -> str:
    """What went wrong, without the URL (webhook URLs are secrets; some errors quote them)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        return f"connection failed ({type(error.reason).__name__})"
    if isinstance(error, ValueError) and ALERT_WEBHOOK_ENV_VAR in str(error):
        return str(error)
    return type(error).__name__


RunEnd = Literal[dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE]
RUN_END_EVENTS: tuple[RunEnd, ...] = (dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE)


def runs_ended_since(instance: dg.DagsterInstance, cursor: str | None, batch_size: int) -> list[dg.EventLogRecord]:
    """Run-end events after the cursor (a storage id), oldest first; with a full page of one
    type, later events of the other type wait for the next tick."""
    after = int(cursor) if cursor else None
    ended: list[dg.EventLogRecord] = []
    horizon: int | None = None
    for event_type in RUN_END_EVENTS:
        page = instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(event_type, after_storage_id=after), limit=batch_size, ascending=True
        )
        ended += page.records
        if page.has_more:
            last = page.records[-1].storage_id
            horizon = last if horizon is None else min(horizon, last)
    kept = (record for record in ended if horizon is None or record.storage_id <= horizon)
    return sorted(kept, key=lambda record: record.storage_id)


def alert_failed_checks(
    context: dg.SensorEvaluationContext, operations: OperationsResource, batch_size: int
) -> dg.SensorResult:
    """Log, and post to the webhook, every failed check evaluation of the runs that ended since
    the cursor; the cursor moves on only once the alert is delivered."""
    ended = runs_ended_since(context.instance, context.cursor, batch_size)
    if not ended:
        return dg.SensorResult(skip_reason="no run ended since the last tick", cursor=context.cursor)
    cursor = str(ended[-1].storage_id)
    failures = [(r.run_id, e) for r in ended for e in failed_check_evaluations(context.instance, r.run_id)]
    if not failures:
        return dg.SensorResult(skip_reason=f"{len(ended)} run(s) ended, no failed checks", cursor=cursor)
    text = alert_text(failures)
    context.log.warning(text)
    url = operations.alert_webhook.strip()
    if not url:
        return dg.SensorResult(skip_reason=f"{len(failures)} failed check(s) logged; no webhook set", cursor=cursor)
    try:
        post_alert(url, text)
    except (OSError, ValueError) as error:
        # keep the old cursor: the same failures are alerted again on the next tick
        context.log.error(f"alert webhook delivery failed: {delivery_error(error)}; retrying next tick")
        return dg.SensorResult(skip_reason="webhook delivery failed", cursor=context.cursor)
    return dg.SensorResult(skip_reason=f"{len(failures)} failed check(s) alerted", cursor=cursor)


def build_check_alert_sensor(batch_size: int = 100) -> dg.SensorDefinition:
    """Alert on every failed asset check evaluation, blocking or not (non-blocking failures
    leave the run green, so run-failure sensors never see them).

    The cursor is the storage id of the last run-end event handled: runs that ended since
    are read for failed evaluations (run-end events are indexed on every storage, check
    evaluations are not on run-sharded SQLite). Checks reported outside a run are not seen.
    """

    @dg.sensor(
        name="check_failure_alerts",
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Failed asset checks -> sensor log, and Slack-style webhook when ${ALERT_WEBHOOK_ENV_VAR} is set.",
    )
    def check_failure_alerts(context: dg.SensorEvaluationContext, operations: OperationsResource) -> dg.SensorResult:
        return alert_failed_checks(context, operations, batch_size)

    return check_failure_alerts


class _CauseOnly(logging.Filter):
    """Cuts a failure's console line before its stack trace (the run's event log keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Stack Trace:" in message:
            record.msg, record.args = message.split("\n", 1)[0] + " (traceback in the run's event log)", None
        return True


@dg.logger(
    {
        "log_level": dg.Field(str, is_required=False, default_value="INFO", description="The logger's threshold."),
        "name": dg.Field(str, is_required=False, default_value="dagster", description="The logger's name."),
        "tracebacks": dg.Field(
            bool, is_required=False, default_value=True, description="Print stack traces of failures."
        ),
    },
    description="Dagster's colored console logger; `gemma-assets materialize` turns its tracebacks off "
    "unless --debug, so that a failure ends in one line naming the cause and the fix.",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    created = create_console_logger(name=config["name"], level=coerce_valid_log_level(config["log_level"]))
    if not config["tracebacks"]:
        for handler in created.handlers:
            handler.addFilter(_CauseOnly())
    return created

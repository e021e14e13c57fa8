"""What every asset module shares: the graph being built, versions, metadata and the wrappers of
asset and check bodies (progress reporting, artefacts kept on a remote data root)."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Concatenate, ParamSpec

import dagster as dg

from gemma_assets.core import progress, remote
from gemma_assets.core.config import ConfigError, RunConfig
from gemma_assets.core.layout import RunLayout, claims_of, is_url
from gemma_assets.core.records import Markdown
from gemma_assets.defs.resources import StorageResource

P = ParamSpec("P")
# seconds between two progress lines of a step in the run log (its first line and the end of
# every task it reported pass regardless); the command line prints what the run log gets
PROGRESS_EVERY_ENV = "GEMMA_ASSETS_PROGRESS_EVERY_S"
# a step's heartbeat repeats its latest line at most this often, even when every update is logged (0 s)
HEARTBEAT_MIN_S = 1.0

# downstream stages recompute by themselves (automation daemon) once their inputs change
FOLLOW_UPSTREAM = dg.AutomationCondition.eager()


@dataclass
class GraphBuild:
    """What a module's builder needs: the resolved run config, facts of this deployment that
    versions depend on, the two partition definitions, and the assets built before it by name."""

    run: RunConfig
    location: str  # data_root/<run name>: outputs of the same config elsewhere are not these
    compute_dtype: str  # what `model.dtype` resolves to here (auto: bfloat16 on a GPU)
    comoment_precision: str  # what `quality.comoment_precision` resolves to here (auto: float64 on a GPU)
    activation_partitions: dg.StaticPartitionsDefinition
    k_partitions: dg.StaticPartitionsDefinition
    assets: dict[str, dg.AssetsDefinition] = field(default_factory=dict)

    def __getitem__(self, name: str) -> dg.AssetsDefinition:
        return self.assets[name]

    def upstream(self, *names: str) -> list[dg.AssetsDefinition]:
        return [self.assets[name] for name in names]

    def deps(self, *names: str) -> list[dg.AssetDep]:
        """Dependencies on these assets, each on all of its partitions (a k partition or an
        unpartitioned asset reads every activation partition, never "the same" key)."""
        return [dg.AssetDep(self.assets[name], partition_mapping=dg.AllPartitionMapping()) for name in names]


def code_version(
    code: str,
    run: RunConfig,
    reads: Sequence[str] = (),
    upstream: Sequence[dg.AssetsDefinition] = (),
    exclude: Sequence[str] = (),
    depends_on: str = "",
) -> str:
    """`code` plus a digest of the config keys an asset reads (dotted paths, less `exclude`), of
    its upstream assets' versions and of what else its output `depends_on` outside the config
    (the output folder, the resolved compute dtype): changing a key marks exactly the assets
    that read it, and everything below them, as stale; an identical config leaves every version
    as it was."""
    parts = [run.digest(*reads, exclude=exclude) if reads else "", depends_on]
    parts += [asset.code_versions_by_key[asset.key] or "" for asset in upstream]
    return f"{code}-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:10]}"


def md(text: Markdown | str) -> dg.MetadataValue:
    return dg.MetadataValue.md(text)


def image_md(path: Path) -> dg.MetadataValue:
    encoded = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{path.stem}](data:image/png;base64,{encoded})")


def progress_every_s() -> float:
    value = os.environ.get(PROGRESS_EVERY_ENV, "10")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise ConfigError(f"{PROGRESS_EVERY_ENV}={value!r} is not a number of seconds -> set it to e.g. 10")
    return seconds


def reports_progress(
    body: Callable[Concatenate[dg.AssetExecutionContext, P], dg.MaterializeResult],
) -> Callable[Concatenate[dg.AssetExecutionContext, P], dg.MaterializeResult]:
    """An asset body whose long loops report to the run log (at most a line per
    $GEMMA_ASSETS_PROGRESS_EVERY_S seconds, default 10; a heartbeat line when that long passes
    with no report at all) and whose materialisation metadata gains `progress`: per task its
    units done, wall time and throughput."""

    @functools.wraps(body)
    def with_progress(context: dg.AssetExecutionContext, *args: P.args, **kwargs: P.kwargs) -> dg.MaterializeResult:
        summary = progress.Summary()
        every_s = progress_every_s()
        # the run log names the step of each line itself
        to_log = progress.Throttled(lambda update: context.log.info(update.line(with_step=False)), every_s)
        with (
            progress.Heartbeat(context.log.info, max(every_s, HEARTBEAT_MIN_S)) as heartbeat,
            progress.reporting(to_log, step=context.op_def.name),
            progress.reporting(heartbeat),
            progress.reporting(summary),
        ):
            result = body(context, *args, **kwargs)
        if not summary.tasks:
            return result
        metadata = {**(result.metadata or {}), "progress": dg.MetadataValue.json(summary.tasks)}
        return dg.MaterializeResult(
            asset_key=result.asset_key,
            metadata=metadata,
            check_results=result.check_results,
            data_version=result.data_version,
            tags=result.tags,
            value=result.value,
        )

    return with_progress


def keeps_artefacts(
    body: Callable[Concatenate[dg.AssetExecutionContext, P], dg.MaterializeResult],
) -> Callable[Concatenate[dg.AssetExecutionContext, P], dg.MaterializeResult]:
    """An asset body (taking the `storage` resource) that, on a URL data root, first pulls the
    committed artefacts of the assets it reads into the run's working copy, then, once it
    succeeds, commits the artefacts it wrote (core.remote). On a local data root: the body alone."""

    @functools.wraps(body)
    def kept(context: dg.AssetExecutionContext, *args: P.args, **kwargs: P.kwargs) -> dg.MaterializeResult:
        layout = _remote_layout(body, "keep", context, kwargs)
        if layout is None:
            return body(context, *args, **kwargs)
        owner = context.asset_key.to_user_string()
        remote.pull(layout, layout.declared - {owner})
        with claims_of(owner) as claimed:
            result = body(context, *args, **kwargs)
        remote.push(layout, owner, context.partition_keys if context.assets_def.partitions_def else [], claimed)
        return result

    return kept


def reads_artefacts(
    check: Callable[Concatenate[dg.AssetCheckExecutionContext, P], dg.AssetCheckResult],
) -> Callable[Concatenate[dg.AssetCheckExecutionContext, P], dg.AssetCheckResult]:
    """A check body (taking the `storage` resource) that, on a URL data root, first pulls the
    committed artefacts of the asset it checks and of that asset's inputs into the run's working
    copy: a check run alone (the UI's "Execute", a run pod of its own) reads what the asset's step
    committed, not a working copy another process filled. On a local data root: the body alone."""

    @functools.wraps(check)
    def pulled(context: dg.AssetCheckExecutionContext, *args: P.args, **kwargs: P.kwargs) -> dg.AssetCheckResult:
        if (layout := _remote_layout(check, "read", context, kwargs)) is not None:
            remote.pull(layout, layout.declared)
        return check(context, *args, **kwargs)

    return pulled


def _remote_layout(
    body: Callable[..., object],
    purpose: str,
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
    kwargs: dict[str, object],
) -> RunLayout | None:
    """The layout `body` reads and writes through when the data root is a URL; None on a local
    root (checked before building a layout: no cost there). `purpose` names what a body without
    the `storage` resource cannot do, in the error."""
    storage = kwargs["storage"]
    if not isinstance(storage, StorageResource):
        raise TypeError(f"{body.__name__} takes no storage resource: it cannot {purpose} artefacts")
    return storage.layout(context) if is_url(storage.data_root) else None

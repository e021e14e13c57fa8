"""The asset of a method fitted by one stage function: what a method declared outside the package
(core/methods.py) needs from Dagster, so its module needs nothing else from it."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dagster as dg

from gemma_assets.core.config import RunConfig
from gemma_assets.core.layout import RunLayout
from gemma_assets.defs.common import FOLLOW_UPSTREAM, GraphBuild, code_version, keeps_artefacts, reports_progress
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource

Fit = Callable[[RunLayout, RunConfig, str], Mapping[str, Any]]


def fitted_by(
    name: str, fit: Fit, reads: Sequence[str], version: str, description: str = ""
) -> Callable[[GraphBuild], list[dg.AssetsDefinition]]:
    """The builder of one unpartitioned asset `name` that runs `fit(layout, run, device)` after
    the assets it `reads`, its progress reported to the run log; fit's return value is the
    materialisation's metadata. Its version follows `version`, the run's `methods` settings and
    the versions of what it reads, so changing any of them marks it stale."""

    def build(graph: GraphBuild) -> list[dg.AssetsDefinition]:
        upstream = graph.upstream(*reads)

        @reports_progress
        @keeps_artefacts
        def body(
            context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource, compute: ComputeResource
        ) -> dg.MaterializeResult:
            metadata = fit(storage.layout(context), run.config, compute.resolved_device)
            return dg.MaterializeResult(metadata=dict(metadata))

        return [
            dg.asset(
                name=name,
                description=description or fit.__doc__,
                deps=graph.deps(*reads),
                code_version=code_version(version, graph.run, ("methods",), upstream),
                automation_condition=FOLLOW_UPSTREAM,
                group_name="methods",
            )(body)
        ]

    return build

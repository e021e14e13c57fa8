"""What every asset module shares: the graph being built, versions and metadata."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from gemma_assets.core.config import RunConfig
from gemma_assets.core.records import Markdown

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

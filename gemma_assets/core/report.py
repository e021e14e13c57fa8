"""The comparison report: markdown rendered from the metric records, findings derived from numbers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from gemma_assets.core.profiles import Profile

COLUMNS = ("name", "family", "heldout_l0", "heldout_fvu", "heldout_mse", "heldout_cosine", "parameters", "fit_seconds")
QUALITY_COLUMNS = (
    "name",
    "heldout_simplified_silhouette",
    "heldout_silhouette_sampled",
    "heldout_davies_bouldin",
    "heldout_size_entropy",
    "heldout_dead_clusters",
    "heldout_tiny_clusters",
    "iterations",
)


class LeakageError(RuntimeError):
    """A model was fitted on held-out data; its held-out metrics would be meaningless."""


def check_no_leakage(records: list[dict], heldout_keys: list[str]) -> None:
    for record in records:
        leaked = sorted(set(record.get("train_partitions", [])) & set(heldout_keys))
        if leaked:
            raise LeakageError(
                f"{record['name']} was fitted on held-out partitions {leaked}: refit it on the "
                "train split (rematerialise it) before reporting"
            )


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(records: list[dict], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines)


def findings(records: list[dict]) -> list[str]:
    """Statements that follow from the numbers; nothing is claimed that they do not show."""
    kmeans = sorted((r for r in records if r["family"] == "k-means"), key=lambda r: r["k"])
    saes = [r for r in records if r["family"].startswith("SAE")]
    lines = []
    if len(kmeans) > 1:
        first, last = kmeans[0], kmeans[-1]
        lines.append(
            f"Raising k from {first['k']} to {last['k']} lowers the held-out FVU of k-means from "
            f"{first['heldout_fvu']:.3f} to {last['heldout_fvu']:.3f} at L0 = 1."
        )
    if kmeans and saes:
        best_km = min(kmeans, key=lambda r: r["heldout_fvu"])
        for record in sorted(saes, key=lambda r: r["heldout_l0"]):
            ratio = best_km["heldout_fvu"] / record["heldout_fvu"] if record["heldout_fvu"] > 0 else float("inf")
            verdict = "lower" if record["heldout_fvu"] < best_km["heldout_fvu"] else "higher"
            lines.append(
                f"SAE {record['name']} (L0 {record['heldout_l0']:.1f}) has {verdict} FVU "
                f"({record['heldout_fvu']:.3f}) than the best k-means, {best_km['name']} "
                f"({best_km['heldout_fvu']:.3f}); ratio {ratio:.2f}x."
            )
    return lines


def render_markdown(profile: Profile, records: list[dict], data: dict, frontier_png: str, config: dict) -> str:
    rows = _table(records, COLUMNS)
    quality = _table([r for r in records if r["family"] == "k-means"], QUALITY_COLUMNS)
    findings_md = "\n".join(f"- {line}" for line in findings(records)) or "- (not enough models to compare)"
    return f"""# Clustering vs sparse autoencoders — {profile.model.name}, block {profile.model.layer}

Profile `{profile.name}`; hook `{profile.model.hook_name}`; git revision `{git_revision()}`.

## Data
- {data["train_tokens"]:,} train tokens (partitions {", ".join(profile.train_partition_keys)}) and
  {data["heldout_tokens"]:,} held-out tokens (partitions {", ".join(profile.heldout_partition_keys)}),
  windows of {profile.sample.context_len} tokens.
- Every metric is computed on held-out tokens no model was fitted on. BOS tokens (position 0)
  are excluded from statistics, whitening, clustering and every metric: their norm is
  {data["bos_ratio"]:.1f}x that of other tokens (massive activations).
- FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, computed by this project in float64.

## Reconstruction on held-out tokens

Gain-shape: spherical k-means, a token is its best direction times its projection (L0 = 1).
top-m: greedy residual coding with m of the k-means directions (L0 = m).

{rows}

## Clustering quality across k (held-out tokens, in the space k-means was fitted in)

{quality}

![L0-FVU frontier]({frontier_png})

## Findings
{findings_md}

## Configuration
```json
{json.dumps(config, indent=1, default=str)}
```
"""

"""activation_stats: one streaming pass over every partition, and the data-quality checks on it.

Integrity and finiteness are judged per partition (corruption: the data must not be used);
input integrity, duplicate windows, token-norm outliers, drift and the Great Expectations suite
look across partitions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from gemma_assets.core import expectations, plots, progress, quality
from gemma_assets.core.config import RunConfig
from gemma_assets.core.engine import Engine, Partitioned
from gemma_assets.core.files import atomic_file, write_json
from gemma_assets.core.layout import RunLayout
from gemma_assets.core.records import CheckReport, Finding, describe
from gemma_assets.core.report import markdown_table
from gemma_assets.core.stats import (
    NORM_BIN_EDGES,
    QUANTILES,
    ActivationMoments,
    PartitionStats,
    compute_partition_stats,
)
from gemma_assets.core.storage import ActivationStore

MAX_QUANTILE_SAMPLE = 200_000  # train tokens kept in memory for the approximate per-dim quantiles
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class StatsSummary:
    """What the statistics pass reports; the tables are also written as parquet files."""

    tables: dict[str, pl.DataFrame]
    bos_mean_norm: float
    bos_to_token_norm_ratio: float
    norm_histogram: Path
    variance_spectrum: Path
    folder: Path


def _cache_is_fresh(layout: RunLayout, store: ActivationStore, key: str, sample_size: int, precision: str) -> bool:
    """Whether partition `key`'s cached statistics are of its committed version, sample size and
    co-moment precision: a new or rewritten partition, a new `quality.quantile_sample_per_partition`
    or precision is the only reason to recompute. Reads the cache's small fields only."""
    path = layout.partition_stats_file(key)
    manifest = store.manifest(key)
    non_bos = manifest["n_tokens"] - manifest["n_tokens"] // manifest["attrs"]["context_len"]
    if not path.exists() or not layout.partition_moments_file(key).exists():
        return False
    try:
        with np.load(path) as cached:
            return (
                str(cached["version"]) == manifest["version"]
                and str(cached["precision"]) == precision
                and len(cached["sample"]) == min(sample_size, non_bos)
            )
    except (OSError, KeyError, ValueError):  # a damaged or half-deleted cache entry is recomputed
        return False


def partition_stats(
    layout: RunLayout,
    engine: Engine,
    keys: list[str],
    sample_size: int,
    log: Callable[[str], None],
    precision: str,
    device: str,
) -> Iterator[PartitionStats]:
    """Each partition's statistics, in `keys` order: cached per committed version, sample size and
    precision; those to compute are tasks of `engine`, saved here as they arrive."""
    store = layout.activation_store()
    stale = [key for key in keys if not _cache_is_fresh(layout, store, key, sample_size, precision)]
    shards = Partitioned.of(engine, store, stale).shards
    computed = engine.imap(compute_partition_stats, shards, sample_size, precision, device)
    for key in keys:
        if key not in stale:
            log(f"statistics of partition {key}: reused (unchanged since last pass)")
            yield layout.partition_stats(key)
            continue
        stats = next(computed)
        stats.save(layout.partition_stats_file(key))
        log(f"statistics of partition {key}: {stats.moments.count} tokens")
        yield stats


def _mean_norms(sums: list[pl.DataFrame], key: str) -> pl.DataFrame:
    return (
        pl.concat(sums)
        .group_by(key)
        .agg(pl.col("tokens").sum(), pl.col("norm").sum())
        .with_columns((pl.col("norm") / pl.col("tokens")).alias("mean_norm"))
        .drop("norm")
        .sort(key)
    )


def _summary_row(split: str, moments: ActivationMoments) -> dict:
    mean_norm = moments.norm_sum / max(moments.count, 1)
    vector_norm = float(np.linalg.norm(moments.mean))
    return {
        "split": split,
        "tokens": moments.count,
        "nonfinite_tokens": moments.nonfinite,
        "mean_token_norm": mean_norm,
        "mean_vector_norm": vector_norm,
        "anisotropy": vector_norm / mean_norm if mean_norm else float("nan"),
        "mean_variance": float(moments.variance.mean()),
    }


def _per_dim(train: ActivationMoments, sample: np.ndarray) -> pl.DataFrame:
    quantiles = np.quantile(sample, QUANTILES, axis=0)
    return pl.DataFrame(
        {
            "dim": np.arange(train.d_model),
            "mean": train.mean,
            "variance": train.variance,
            "min": train.minimum,
            "max": train.maximum,
            **{f"q{round(q * 100):02d}": quantiles[i] for i, q in enumerate(QUANTILES)},
        }
    )


@dataclass
class _Pass:
    """What the pass over partitions accumulates, one partition in memory at a time."""

    merged: dict[str, ActivationMoments]
    position_sums: list[pl.DataFrame]
    stratum_sums: list[pl.DataFrame]
    samples: list[np.ndarray]
    massive_rows: list[dict]

    def add(self, part: PartitionStats, split: str, token_ids: np.ndarray, quantile_rows: int, context_len: int):
        self.merged[split].merge(part.moments)  # exact (Chan et al.)
        frame = pl.DataFrame({"position": part.positions, "stratum": part.strata, "norm": part.norms.astype(float)})
        self.position_sums.append(frame.group_by("position").agg(pl.len().alias("tokens"), pl.col("norm").sum()))
        non_bos = frame.filter(pl.col("position") != 0)
        self.stratum_sums.append(non_bos.group_by("stratum").agg(pl.len().alias("tokens"), pl.col("norm").sum()))
        if split == "train":
            self.samples.append(part.sample[:quantile_rows])
        self.massive_rows += [
            {
                "partition": part.key,
                "row": int(r),
                "position": int(r) % context_len,
                "token_id": int(token_ids[int(r)]),
                "dim": int(d),
                "value": float(v),
            }
            for r, d, v in part.massive
        ]


def summarise(
    layout: RunLayout, run: RunConfig, log: Callable[[str], None], precision: str, device: str, engine: Engine
) -> StatsSummary:
    """Per-dimension mean/variance/min/max/quantiles and covariance (float64 sums, BOS excluded,
    merged exactly across partitions), token-norm tables by position and stratum, the largest
    activations and the tokens that carry them; every table written under stats/. The co-moment's
    `precision` (core.stats.PRECISIONS), the `device` it runs on and the `engine` of the
    partitions' passes come from the compute resource."""
    store = layout.activation_store()
    split_of = dict.fromkeys(run.train_partition_keys, "train") | dict.fromkeys(run.heldout_partition_keys, "heldout")
    manifest = store.manifest(run.partition_keys[0])
    acc = _Pass({name: ActivationMoments(manifest["d_model"]) for name in SPLITS}, [], [], [], [])
    quantile_rows = max(1, MAX_QUANTILE_SAMPLE // len(run.train_partition_keys))
    with progress.task("statistics pass", store.token_count(run.partition_keys), "tokens") as done:
        sample_size = run.quality.quantile_sample_per_partition
        parts = partition_stats(layout, engine, run.partition_keys, sample_size, log, precision, device)
        for key, part in zip(run.partition_keys, parts, strict=True):
            token_ids = store.open(key).array("token_ids")
            acc.add(part, split_of[key], token_ids, quantile_rows, run.sampling.context_len)
            done.advance(len(token_ids))
    for name, moments in acc.merged.items():
        moments.save(layout.moments_file(name))
    train = acc.merged["train"]
    names = manifest["attrs"].get("stratum_names", [])
    by_position = _mean_norms(acc.position_sums, "position")
    tables = {
        "per_dim": _per_dim(train, np.concatenate(acc.samples)),
        "summary": pl.DataFrame([_summary_row(name, moments) for name, moments in acc.merged.items()]),
        "by_position": by_position,
        "by_stratum": _mean_norms(acc.stratum_sums, "stratum").with_columns(
            pl.col("stratum").map_elements(lambda i: names[i] if i < len(names) else str(i), return_dtype=pl.String)
        ),
        "massive_tokens": pl.DataFrame(acc.massive_rows).sort(pl.col("value").abs(), descending=True).head(10),
    }
    for name, frame in tables.items():
        with atomic_file(layout.stats_file(f"{name}.parquet")) as staging:
            frame.write_parquet(staging)
    bos_norm = float(by_position.filter(pl.col("position") == 0)["mean_norm"][0])
    bos_ratio = bos_norm / tables["summary"]["mean_token_norm"][0]
    write_json(layout.stats_file("bos.json"), {"bos_mean_norm": bos_norm, "bos_to_token_norm_ratio": bos_ratio})
    histogram = plots.norm_histogram(NORM_BIN_EDGES, train.norm_histogram, layout.stats_file("norm_histogram.png"))
    spectrum = plots.spectrum(
        train.variance, layout.stats_file("variance_spectrum.png"), "dimension (sorted by variance)", "variance"
    )
    return StatsSummary(tables, bos_norm, bos_ratio, histogram, spectrum, layout.stats_file("per_dim.parquet").parent)


# the checks


def partition_integrity(layout: RunLayout, run: RunConfig, key: str) -> CheckReport:
    """Committed, CRC32 of every chunk file as recorded, shapes/dtype/attributes, token ids in
    the vocabulary, positions 0..L-1 per window, BOS first."""
    store = layout.activation_store()
    found = quality.partition_integrity(store, key, run.sampling.tokens_per_partition, run.sampling.context_len)
    return CheckReport.of(found, "intact", {"problems": len(found)})


def partition_finite(layout: RunLayout, run: RunConfig, key: str) -> CheckReport:
    """No NaN or Inf anywhere in the partition (BOS included)."""
    found = quality.partition_nonfinite(layout.activation_store(), key, run.sampling.context_len)
    return CheckReport.of(found, "every value is finite", {"nonfinite_values_listed": len(found)})


def inputs_intact(layout: RunLayout, run: RunConfig) -> CheckReport:
    """Every partition present, committed and matching its checksums; no NaN/Inf counted."""
    store = layout.activation_store()
    committed = set(store.committed_keys())  # one listing of the store, not one per partition
    found = [
        Finding("missing or uncommitted", quality.REMATERIALISE, partition=key)
        for key in run.partition_keys
        if key not in committed
    ]
    for key in (key for key in run.partition_keys if key in committed):
        found += [Finding(problem, quality.REMATERIALISE, partition=key) for problem in store.verify(key)]
        moments_file = layout.partition_moments_file(key)
        if moments_file.exists() and (count := ActivationMoments.load(moments_file).nonfinite):
            found.append(Finding(f"{count} tokens with NaN/Inf", quality.REMATERIALISE, partition=key))
    passed_text = f"all {len(run.partition_keys)} partitions committed, intact and finite"
    return CheckReport.of(found, passed_text, {"problems": len(found)})


def no_duplicate_windows(layout: RunLayout, run: RunConfig) -> CheckReport:
    """No (document, offset) window sampled twice, within or across partitions."""
    windows = {key: layout.partition_stats(key).windows for key in run.partition_keys}
    found = quality.duplicate_windows(windows)
    metadata = {"duplicates": len(found), "windows": sum(len(w) for w in windows.values())}
    return CheckReport.of(found, "every window is unique", metadata)


def token_norms_in_bounds(layout: RunLayout, run: RunConfig) -> CheckReport:
    """Robust z-score of log token norm (bounds learned from the train split, BOS excluded);
    fails when the share of outliers exceeds the configured threshold."""
    spec = run.quality
    train = np.concatenate([layout.partition_stats(key).sample for key in run.train_partition_keys])
    median, mad = quality.log_norm_bounds(np.linalg.norm(train, axis=1))
    outliers, total = [], 0
    for key in run.partition_keys:  # one partition in memory at a time
        part = layout.partition_stats(key)
        rows = np.flatnonzero(part.positions != 0)
        z = quality.robust_log_norm_z(np.maximum(part.norms[rows], 1e-30), median, mad)
        total += len(rows)
        outliers += [
            (float(z[i]), key, int(rows[i]), int(part.positions[rows[i]]))
            for i in np.flatnonzero(abs(z) > spec.outlier_z)
        ]
    share = len(outliers) / max(total, 1)
    worst = sorted(outliers, key=lambda o: -abs(o[0]))[:5]
    named = "; ".join(f"partition {k} row {r} (position {p}): z = {z:.1f}" for z, k, r, p in worst)
    absurd = [o for o in outliers if abs(o[0]) > spec.absurd_z]
    metadata = {"outlier_share": share, "outliers": len(outliers), "log_norm_median": median, "log_norm_mad": mad}
    if share <= spec.max_outlier_share and not absurd:
        return CheckReport(True, f"{share:.3%} outlier tokens" + (f"; largest: {named}" if named else ""), metadata)
    description = (
        f"{share:.3%} of tokens have |z| > {spec.outlier_z} (allowed {spec.max_outlier_share:.3%}), "
        f"{len(absurd)} beyond |z| > {spec.absurd_z}: {named} "
        "-> inspect these tokens; rematerialise the partitions if the values are corrupt"
    )
    return CheckReport(False, description, metadata)


def partition_drift(layout: RunLayout, run: RunConfig) -> CheckReport:
    """Per-dimension mean shift of each partition from the pooled mean, in pooled SDs."""
    parts = {key: layout.partition_moments(key) for key in run.partition_keys}

    pooled = ActivationMoments(next(iter(parts.values())).d_model)
    for moments in parts.values():
        pooled.merge(moments)
    drift = quality.mean_drift({k: m.mean for k, m in parts.items()}, pooled.mean, np.sqrt(pooled.variance))
    table = pl.DataFrame([{"partition": k, **d} for k, d in drift.items()])
    found = [
        Finding(f"moved {d['max_shift_sd']:.2f} SD on dim {d['dim']}", quality.DRIFT_FIX, partition=k, dim=d["dim"])
        for k, d in drift.items()
        if d["max_shift_sd"] > run.quality.max_drift_sd
    ]
    metadata = {"drift": markdown_table(table.to_dicts(), tuple(table.columns))}
    if not found:
        return CheckReport(True, f"largest shift {max(d['max_shift_sd'] for d in drift.values()):.3f} SD", metadata)
    return CheckReport(False, describe(found) + f" (threshold {run.quality.max_drift_sd})", metadata, tuple(found))


def stats_expectations(layout: RunLayout) -> CheckReport:
    """Great Expectations suite over the per-dimension and summary tables."""
    tables = {name: pl.read_parquet(layout.stats_file(f"{name}.parquet")) for name in ("per_dim", "summary")}
    success, report = expectations.run_suite(tables)
    failed = report.filter(~pl.col("success"))
    metadata = {"expectations": markdown_table(report.to_dicts(), tuple(report.columns))}
    if success:
        return CheckReport(True, f"all {len(report)} expectations met", metadata)
    listed = "; ".join(
        f"{r['table']}.{r['column']} {r['expectation']} ({r['unexpected']} unexpected, e.g. {r['examples']})"
        for r in failed.iter_rows(named=True)
    )
    return CheckReport(False, f"failed expectations: {listed}", metadata)

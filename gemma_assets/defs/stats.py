"""activation_stats: one streaming pass over every partition, and the data-quality checks.

Per-partition checks on `activations` (integrity, finite values) are ERROR and blocking;
cross-partition checks on `activation_stats`: input integrity and duplicate windows are
ERROR and blocking (clustering must not run on corrupt data); token-norm outliers, drift
and the Great Expectations suite are WARN.
"""

import dagster as dg
import numpy as np
import polars as pl

from gemma_assets.core import expectations, plots, quality
from gemma_assets.core.config import RunConfig
from gemma_assets.core.files import atomic_file, write_json
from gemma_assets.core.stats import NORM_BIN_EDGES, QUANTILES, ActivationMoments, PartitionStats
from gemma_assets.defs.common import FOLLOW_UPSTREAM, code_version, image_md, markdown_table, table_md
from gemma_assets.defs.resources import RunResource, StorageResource

MAX_QUANTILE_SAMPLE = 200_000  # train tokens kept in memory for the approximate per-dim quantiles
REMATERIALISE = "-> rematerialise activations partition(s) {keys}"


def _partition_stats(context, store, storage: StorageResource, key: str, sample_size: int) -> PartitionStats:
    """Cached per committed version and sample size: a new or rewritten partition, or a new
    `quality.quantile_sample_per_partition`, is the only reason to recompute."""
    path = storage.path("stats", f"part-{key}.npz")
    manifest = store.manifest(key)
    non_bos = manifest["n_tokens"] - manifest["n_tokens"] // manifest["attrs"]["context_len"]
    if path.exists():
        with np.load(path) as cached:
            reusable = str(cached["version"]) == manifest["version"] and len(cached["sample"]) == min(
                sample_size, non_bos
            )
        if reusable:
            context.log.info(f"statistics of partition {key}: reused (unchanged since last pass)")
            return PartitionStats.load(path)
    stats = PartitionStats.compute(store, key, sample_size)
    stats.save(path)
    context.log.info(f"statistics of partition {key}: {stats.moments.count} tokens")
    return stats


def _mean_norms(sums: list[pl.DataFrame], key: str) -> pl.DataFrame:
    return (
        pl.concat(sums)
        .group_by(key)
        .agg(pl.col("tokens").sum(), pl.col("norm").sum())
        .with_columns((pl.col("norm") / pl.col("tokens")).alias("mean_norm"))
        .drop("norm")
        .sort(key)
    )


def build_stats_assets(
    run_config: RunConfig, activations: dg.AssetsDefinition, partitions_def: dg.PartitionsDefinition
) -> list:
    @dg.asset_check(asset=activations, partitions_def=partitions_def, blocking=True)
    def activations_integrity(
        context: dg.AssetCheckExecutionContext, run: RunResource, storage: StorageResource
    ) -> dg.AssetCheckResult:
        """Committed, CRC32 of every chunk file as recorded, shapes/dtype/attributes, token ids
        in the vocabulary, positions 0..L-1 per window, BOS first."""
        prof, store = run.config, storage.activation_store()
        problems = []
        for key in context.partition_keys:
            problems += quality.partition_integrity(
                store, key, prof.sampling.tokens_per_partition, prof.sampling.context_len
            )
        bad = sorted({p.split(":")[0].split()[-1] for p in problems})
        return dg.AssetCheckResult(
            passed=not problems,
            description="; ".join(problems[:10]) + " " + REMATERIALISE.format(keys=", ".join(bad))
            if problems
            else "intact",
            metadata={"problems": len(problems), "partitions_checked": len(context.partition_keys)},
        )

    @dg.asset_check(asset=activations, partitions_def=partitions_def, blocking=True)
    def activations_finite(
        context: dg.AssetCheckExecutionContext, run: RunResource, storage: StorageResource
    ) -> dg.AssetCheckResult:
        """No NaN or Inf anywhere in the partition (BOS included)."""
        store, context_len = storage.activation_store(), run.config.sampling.context_len
        problems = {key: quality.partition_nonfinite(store, key, context_len) for key in context.partition_keys}
        problems = {key: found for key, found in problems.items() if found}
        lines = [line for found in problems.values() for line in found]
        return dg.AssetCheckResult(
            passed=not problems,
            description=(
                "non-finite or unreadable activations: "
                + "; ".join(lines[:10])
                + " "
                + REMATERIALISE.format(keys=", ".join(problems))
                if problems
                else "every value is finite"
            ),
            metadata={"nonfinite_values_listed": len(lines)},
        )

    @dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[activations],
        # the split (which partitions are held out) and the quantile sample size; the other
        # quality keys are thresholds of checks, which have no version
        code_version=code_version(
            "2", run_config, ("sampling", "quality.quantile_sample_per_partition"), [activations]
        ),
        group_name="statistics",
        kinds={"numpy", "parquet"},
    )
    def activation_stats(
        context: dg.AssetExecutionContext, run: RunResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Per-dimension mean/variance/min/max/quantiles and covariance (float64, BOS excluded,
        merged exactly across partitions), token-norm tables by position and stratum, the
        largest activations and the tokens that carry them."""
        prof, store = run.config, storage.activation_store()
        split_of = {key: "train" for key in prof.train_partition_keys} | {
            k: "heldout" for k in prof.heldout_partition_keys
        }
        d_model = store.manifest(prof.partition_keys[0])["d_model"]
        merged = {name: ActivationMoments(d_model) for name in ("train", "heldout")}
        position_sums, stratum_sums, samples, massive_rows = [], [], [], []
        quantile_rows_per_partition = max(1, MAX_QUANTILE_SAMPLE // len(prof.train_partition_keys))
        for key in prof.partition_keys:  # one partition in memory at a time
            part = _partition_stats(context, store, storage, key, prof.quality.quantile_sample_per_partition)
            merged[split_of[key]].merge(part.moments)  # exact (Chan et al.)
            frame = pl.DataFrame(
                {"position": part.positions, "stratum": part.strata, "norm": part.norms.astype(np.float64)}
            )
            position_sums.append(frame.group_by("position").agg(pl.len().alias("tokens"), pl.col("norm").sum()))
            stratum_sums.append(
                frame.filter(pl.col("position") != 0)
                .group_by("stratum")
                .agg(pl.len().alias("tokens"), pl.col("norm").sum())
            )
            if split_of[key] == "train":
                samples.append(part.sample[:quantile_rows_per_partition])
            token_ids = store.open(key).array("token_ids")
            massive_rows += [
                {
                    "partition": key,
                    "row": int(r),
                    "position": int(r) % prof.sampling.context_len,
                    "token_id": int(token_ids[int(r)]),
                    "dim": int(d),
                    "value": float(v),
                }
                for r, d, v in part.massive
            ]
        summary_rows = []
        for name, moments in merged.items():
            moments.save(storage.path("stats", f"{name}_moments.npz"))
            mean_norm = moments.norm_sum / max(moments.count, 1)
            summary_rows.append(
                {
                    "split": name,
                    "tokens": moments.count,
                    "nonfinite_tokens": moments.nonfinite,
                    "mean_token_norm": mean_norm,
                    "mean_vector_norm": float(np.linalg.norm(moments.mean)),
                    "anisotropy": float(np.linalg.norm(moments.mean)) / mean_norm if mean_norm else float("nan"),
                    "mean_variance": float(moments.variance.mean()),
                }
            )
        train = merged["train"]
        sample = np.concatenate(samples)
        quantiles = np.quantile(sample, QUANTILES, axis=0)
        per_dim = pl.DataFrame(
            {
                "dim": np.arange(train.d_model),
                "mean": train.mean,
                "variance": train.variance,
                "min": train.minimum,
                "max": train.maximum,
                **{f"q{round(q * 100):02d}": quantiles[i] for i, q in enumerate(QUANTILES)},
            }
        )
        summary = pl.DataFrame(summary_rows)
        names = store.manifest(prof.partition_keys[0])["attrs"].get("stratum_names", [])
        by_position = _mean_norms(position_sums, "position")
        by_stratum = _mean_norms(stratum_sums, "stratum").with_columns(
            pl.col("stratum").map_elements(lambda i: names[i] if i < len(names) else str(i), return_dtype=pl.String)
        )
        massive = pl.DataFrame(massive_rows).sort(pl.col("value").abs(), descending=True).head(10)
        for table_name, frame in {
            "per_dim": per_dim,
            "summary": summary,
            "by_position": by_position,
            "by_stratum": by_stratum,
            "massive_tokens": massive,
        }.items():
            with atomic_file(storage.path("stats", f"{table_name}.parquet")) as staging:
                frame.write_parquet(staging)
        bos_norm = float(by_position.filter(pl.col("position") == 0)["mean_norm"][0])
        bos_ratio = bos_norm / summary_rows[0]["mean_token_norm"]
        write_json(storage.path("stats", "bos.json"), {"bos_mean_norm": bos_norm, "bos_to_token_norm_ratio": bos_ratio})
        histogram = plots.norm_histogram(
            NORM_BIN_EDGES, train.norm_histogram, storage.path("stats", "norm_histogram.png")
        )
        spectrum = plots.spectrum(
            train.variance, storage.path("stats", "variance_spectrum.png"), "dimension (sorted by variance)", "variance"
        )
        return dg.MaterializeResult(
            metadata={
                "summary": table_md(summary),
                "bos_mean_norm": bos_norm,
                "bos_to_token_norm_ratio": bos_ratio,
                "largest_activations": table_md(massive),
                "norm_by_stratum": table_md(by_stratum),
                "norm_by_position_first_5": table_md(by_position.head(5)),
                "norm_histogram": image_md(histogram),
                "variance_spectrum": image_md(spectrum),
                "tables": dg.MetadataValue.path(str(storage.path("stats"))),
            }
        )

    @dg.asset_check(asset=activation_stats, blocking=True)
    def inputs_intact(run: RunResource, storage: StorageResource) -> dg.AssetCheckResult:
        """Every partition present, committed and matching its checksums; no NaN/Inf counted."""
        prof, store = run.config, storage.activation_store()
        committed = set(store.committed_keys())  # one listing of the store, not one per partition
        missing = [k for k in prof.partition_keys if k not in committed]
        problems = [f"partition {k} is missing or uncommitted" for k in missing]
        problems += [p for k in prof.partition_keys if k not in missing for p in store.verify(k)]
        for key in prof.partition_keys:
            path = storage.path("stats", f"part-{key}.moments.npz")
            if path.exists() and (count := ActivationMoments.load(path).nonfinite):
                problems.append(f"partition {key}: {count} tokens with NaN/Inf")
        bad = sorted({p.split()[1].rstrip(":") for p in problems})
        return dg.AssetCheckResult(
            passed=not problems,
            description="; ".join(problems[:10]) + " " + REMATERIALISE.format(keys=", ".join(bad))
            if problems
            else f"all {len(prof.partition_keys)} partitions committed, intact and finite",
            metadata={"problems": len(problems)},
        )

    @dg.asset_check(asset=activation_stats, blocking=True)
    def no_duplicate_windows(run: RunResource, storage: StorageResource) -> dg.AssetCheckResult:
        """No (document, offset) window sampled twice, within or across partitions."""
        windows = {
            k: PartitionStats.load(storage.path("stats", f"part-{k}.npz")).windows for k in run.config.partition_keys
        }
        problems = quality.duplicate_windows(windows)
        return dg.AssetCheckResult(
            passed=not problems,
            description="; ".join(problems[:10]) + " -> the sample is broken: rematerialise pile_sample and activations"
            if problems
            else "every window is unique",
            metadata={"duplicates": len(problems), "windows": sum(len(w) for w in windows.values())},
        )

    @dg.asset_check(asset=activation_stats)
    def token_norms_in_bounds(run: RunResource, storage: StorageResource) -> dg.AssetCheckResult:
        """Robust z-score of log token norm (bounds learned from the train split, BOS excluded);
        WARN when the share of outliers exceeds the configured threshold."""
        spec = run.config.quality
        keys = run.config.partition_keys
        train_sample = np.concatenate(
            [
                PartitionStats.load(storage.path("stats", f"part-{k}.npz")).sample
                for k in run.config.train_partition_keys
            ]
        )
        median, mad = quality.log_norm_bounds(np.linalg.norm(train_sample, axis=1))
        outliers, total = [], 0
        for key in keys:  # one partition in memory at a time
            part = PartitionStats.load(storage.path("stats", f"part-{key}.npz"))
            rows = np.flatnonzero(part.positions != 0)
            z = quality.robust_log_norm_z(np.maximum(part.norms[rows], 1e-30), median, mad)
            total += len(rows)
            outliers += [
                (float(z[i]), key, int(rows[i]), int(part.positions[rows[i]]))
                for i in np.flatnonzero(np.abs(z) > spec.outlier_z)
            ]
        share = len(outliers) / max(total, 1)
        worst = sorted(outliers, key=lambda o: -abs(o[0]))[:5]
        named = "; ".join(f"partition {k} row {r} (position {p}): z = {z:.1f}" for z, k, r, p in worst)
        absurd = [o for o in outliers if abs(o[0]) > spec.absurd_z]
        passed = share <= spec.max_outlier_share and not absurd
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.WARN,
            description=(
                f"{share:.3%} of tokens have |z| > {spec.outlier_z} (allowed {spec.max_outlier_share:.3%}), "
                f"{len(absurd)} beyond |z| > {spec.absurd_z}: {named} "
                "-> inspect these tokens; rematerialise the partitions if the values are corrupt"
                if not passed
                else f"{share:.3%} outlier tokens" + (f"; largest: {named}" if named else "")
            ),
            metadata={
                "outlier_share": share,
                "outliers": len(outliers),
                "log_norm_median": median,
                "log_norm_mad": mad,
            },
        )

    @dg.asset_check(asset=activation_stats)
    def partition_drift(run: RunResource, storage: StorageResource) -> dg.AssetCheckResult:
        """Per-dimension mean shift of each partition from the pooled mean, in pooled SDs."""
        prof = run.config
        parts = {k: ActivationMoments.load(storage.path("stats", f"part-{k}.moments.npz")) for k in prof.partition_keys}
        pooled = ActivationMoments(next(iter(parts.values())).d_model)
        for moments in parts.values():
            pooled.merge(moments)
        drift = quality.mean_drift({k: m.mean for k, m in parts.items()}, pooled.mean, np.sqrt(pooled.variance))
        flagged = {k: d for k, d in drift.items() if d["max_shift_sd"] > prof.quality.max_drift_sd}
        table = pl.DataFrame([{"partition": k, **d} for k, d in drift.items()])
        return dg.AssetCheckResult(
            passed=not flagged,
            severity=dg.AssetCheckSeverity.WARN,
            description=(
                "; ".join(
                    f"partition {k} moved {d['max_shift_sd']:.2f} SD on dim {d['dim']}" for k, d in flagged.items()
                )
                + f" (threshold {prof.quality.max_drift_sd}) -> compare its strata and source; rematerialise if corrupt"
                if flagged
                else f"largest shift {table['max_shift_sd'].max():.3f} SD"
            ),
            metadata={"drift": dg.MetadataValue.md(markdown_table(table))},
        )

    @dg.asset_check(asset=activation_stats)
    def stats_expectations(storage: StorageResource) -> dg.AssetCheckResult:
        """Great Expectations suite over the per-dimension and summary tables."""
        tables = {name: pl.read_parquet(storage.path("stats", f"{name}.parquet")) for name in ("per_dim", "summary")}
        success, report = expectations.run_suite(tables)
        failed = report.filter(~pl.col("success"))
        return dg.AssetCheckResult(
            passed=success,
            severity=dg.AssetCheckSeverity.WARN,
            description=(
                "failed expectations: "
                + "; ".join(
                    f"{r['table']}.{r['column']} {r['expectation']} ({r['unexpected']} unexpected, e.g. {r['examples']})"
                    for r in failed.iter_rows(named=True)
                )
                if len(failed)
                else f"all {len(report)} expectations met"
            ),
            metadata={"expectations": dg.MetadataValue.md(markdown_table(report))},
        )

    return [
        activation_stats,
        activations_integrity,
        activations_finite,
        inputs_intact,
        no_duplicate_windows,
        token_norms_in_bounds,
        partition_drift,
        stats_expectations,
    ]

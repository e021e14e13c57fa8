"""activation_stats: one streaming pass over every partition, plus the blocking data checks."""

import json

import dagster as dg
import numpy as np
import polars as pl
import torch

from gemma_assets.core import plots
from gemma_assets.core.stats import NORM_BIN_EDGES, ActivationMoments
from gemma_assets.defs.common import FOLLOW_UPSTREAM, image_md, table_md
from gemma_assets.defs.resources import ProfileResource, StorageResource


def build_stats_assets(activations: dg.AssetsDefinition) -> list:
    @dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[activations],
        code_version="1",
        group_name="statistics",
        kinds={"numpy", "parquet"},
    )
    def activation_stats(
        context: dg.AssetExecutionContext, profile: ProfileResource, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Per-dimension mean/variance/min/max and covariance (float64, BOS excluded) of the
        train split, the same for the held-out split, BOS norms and non-finite counts."""
        prof = profile.profile
        store = storage.activation_store()
        split = {"train": prof.train_partition_keys, "heldout": prof.heldout_partition_keys}
        summary_rows, bos_norms, merged = [], [], {}
        for name, keys in split.items():
            merged[name] = moments = ActivationMoments(store.manifest(keys[0])["d_model"])
            for key in keys:
                part_moments = ActivationMoments(moments.d_model)
                for acts, info in store.iter_tokens([key], exclude_bos=False):
                    bos = torch.from_numpy(info["positions"] == 0)
                    bos_norms.append(acts[bos].norm(dim=1))
                    part_moments.nonfinite += int((~torch.isfinite(acts[bos])).any(1).sum())
                    part_moments.update(acts[~bos])
                part_moments.save(storage.path("stats", f"part-{key}.npz"))
                moments.merge(part_moments)  # exact (Chan): a new partition needs no full recompute
                context.log.info(f"statistics of partition {key} ({name}): {part_moments.count} tokens")
            moments.save(storage.path("stats", f"{name}_moments.npz"))
            summary_rows.append(
                {
                    "split": name,
                    "tokens": moments.count,
                    "nonfinite_tokens": moments.nonfinite,
                    "mean_token_norm": moments.norm_sum / max(moments.count, 1),
                    "mean_vector_norm": float(np.linalg.norm(moments.mean)),
                    "mean_variance": float(moments.variance.mean()),
                }
            )
        train = merged["train"]
        per_dim = pl.DataFrame(
            {
                "dim": np.arange(train.d_model),
                "mean": train.mean,
                "variance": train.variance,
                "min": train.minimum,
                "max": train.maximum,
            }
        )
        per_dim.write_parquet(storage.path("stats", "per_dim.parquet"))
        summary = pl.DataFrame(summary_rows)
        summary.write_parquet(storage.path("stats", "summary.parquet"))
        massive = per_dim.with_columns(pl.max_horizontal(pl.col("max").abs(), pl.col("min").abs()).alias("peak"))
        massive = massive.sort("peak", descending=True).head(5)
        bos_norm = float(torch.cat(bos_norms).mean())
        bos_ratio = bos_norm / summary_rows[0]["mean_token_norm"]
        storage.path("stats", "bos.json").write_text(
            json.dumps({"bos_mean_norm": bos_norm, "bos_to_token_norm_ratio": bos_ratio})
        )
        plot = plots.norm_histogram(NORM_BIN_EDGES, train.norm_histogram, storage.path("stats", "norm_histogram.png"))
        return dg.MaterializeResult(
            metadata={
                "summary": table_md(summary),
                "bos_mean_norm": bos_norm,
                "bos_to_token_norm_ratio": bos_ratio,
                "largest_magnitude_dims": table_md(massive),
                "norm_histogram": image_md(plot),
            }
        )

    @dg.asset_check(asset=activation_stats, blocking=True, description="partitions committed, intact, well-formed")
    def activations_integrity(profile: ProfileResource, storage: StorageResource) -> dg.AssetCheckResult:
        prof = profile.profile
        store = storage.activation_store()
        problems = []
        for key in prof.partition_keys:
            try:
                problems += store.verify(key)
                part = store.open(key)
            except Exception as error:  # a missing commit or unreadable metadata is itself the finding
                problems.append(f"partition {key}: {error}")
                continue
            if part.n_tokens != prof.sample.tokens_per_partition:
                problems.append(f"partition {key}: {part.n_tokens} tokens, expected {prof.sample.tokens_per_partition}")
            if part.group["activations"].attrs.get("dtype") != "bfloat16":
                problems.append(f"partition {key}: activations lack the bfloat16 dtype attribute")
            vocab = part.manifest["attrs"]["vocab_size"]
            if int(part.array("token_ids").max()) >= vocab:
                problems.append(f"partition {key}: token ids outside the vocabulary of {vocab}")
        return dg.AssetCheckResult(
            passed=not problems,
            severity=dg.AssetCheckSeverity.ERROR,
            description=(
                "; ".join(problems[:20]) + " -> rematerialise the named activation partitions"
                if problems
                else f"all {len(prof.partition_keys)} partitions committed and checksums match"
            ),
            metadata={"problems": len(problems)},
        )

    @dg.asset_check(asset=activation_stats, blocking=True, description="no NaN or Inf activations")
    def activations_finite(profile: ProfileResource, storage: StorageResource) -> dg.AssetCheckResult:
        counts = {
            key: ActivationMoments.load(storage.path("stats", f"part-{key}.npz")).nonfinite
            for key in profile.profile.partition_keys
        }
        bad = {key: count for key, count in counts.items() if count}
        return dg.AssetCheckResult(
            passed=not bad,
            severity=dg.AssetCheckSeverity.ERROR,
            description=(
                f"tokens with NaN/Inf activations in partitions {bad}: rematerialise those "
                "activation partitions (and check the model dtype)"
                if bad
                else "every token is finite"
            ),
            metadata={"nonfinite_tokens": sum(counts.values())},
        )

    return [activation_stats, activations_integrity, activations_finite]

"""Statistics-pass benchmark: throughput and peak memory at two data sizes.

    python benchmarks/stats.py --json benchmarks/results/stats_cpu.json

Writes synthetic bf16 partitions (per-dimension scales over three decades plus a few
massive dimensions, like real residual streams) and runs the per-partition statistics pass
(moments with covariance, norms, quantile sample, largest activations) over them, merging
partitions exactly, with the co-moment in each precision (`mixed`, the CPU's default, and
`float64`). Baseline in the same process: a plain read-and-decode pass over the same store.
Memory is the RSS high-water mark above the level before each pass, sampled every 5 ms: it
should not grow with the number of partitions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_assets.core.bf16 import bf16_to_bits  # noqa: E402
from gemma_assets.core.memory import RssTrace  # noqa: E402
from gemma_assets.core.stats import PRECISIONS, ActivationMoments, PartitionStats  # noqa: E402
from gemma_assets.core.storage import ActivationStore  # noqa: E402


def write_store(root: Path, n_partitions: int, tokens: int, d_model: int, context_len: int = 128) -> ActivationStore:
    store = ActivationStore(str(root))
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 2, d_model)
    scales[:3] = 1e3  # massive dimensions
    for index in range(n_partitions):
        x = torch.randn(tokens, d_model, generator=generator) * scales
        positions = np.arange(tokens, dtype=np.int32) % context_len
        arrays = {
            "activations": bf16_to_bits(x),
            "token_ids": np.full(tokens, 7, np.int32),
            "positions": positions,
            "doc_ids": np.repeat(np.arange(tokens // context_len) + index * tokens, context_len),
            "doc_offsets": positions.astype(np.int64) - 1,
            "strata": np.zeros(tokens, np.int16),
        }
        store.write_partition(f"{index:04d}", arrays, {"context_len": context_len, "bos_token_id": 2})
    return store


def measure(store: ActivationStore, keys: list[str], d_model: int) -> dict:
    gb = sum(store.manifest(k)["n_tokens"] for k in keys) * d_model * 2 / 1e9
    with RssTrace() as read_rss:
        started = time.perf_counter()
        for _ in store.iter_tokens(keys, exclude_bos=False):
            pass
        read_seconds = time.perf_counter() - started
    row = {"partitions": len(keys), "gb": gb, "read_gb_per_s": gb / read_seconds, "read_peak_rss_mb": read_rss.mb}
    moments = {}
    for precision in PRECISIONS:
        with RssTrace() as stats_rss:
            started = time.perf_counter()
            total = ActivationMoments(d_model)
            for key in keys:
                total.merge(PartitionStats.compute(store, key, sample_size=2048, precision=precision).moments)
            stats_seconds = time.perf_counter() - started
        moments[precision] = total
        row[precision] = {
            "gb_per_s": gb / stats_seconds,
            "stats_vs_read_speed": read_seconds / stats_seconds,
            "peak_rss_mb": stats_rss.mb,
            "tokens": total.count,
        }
    exact, mixed = moments["float64"].covariance, moments["mixed"].covariance
    row["mixed_max_relative_difference"] = float(
        (np.abs(mixed - exact) / np.sqrt(np.outer(np.diag(exact), np.diag(exact)))).max()
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--tokens-per-partition", type=int, default=1 << 16)
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[2, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        store = write_store(Path(scratch), max(args.sizes), args.tokens_per_partition, args.d_model)
        keys = store.committed_keys()
        rows = [measure(store, keys[:size], args.d_model) for size in args.sizes]
    last, first = rows[-1], rows[0]
    figures = {
        "d_model": args.d_model,
        "tokens_per_partition": args.tokens_per_partition,
        "torch_threads": torch.get_num_threads(),
        "sizes": rows,
        "read_gb_per_s": last["read_gb_per_s"],
        "gb_per_s": last["mixed"]["gb_per_s"],
        "stats_vs_read_speed": last["mixed"]["stats_vs_read_speed"],
        "float64_stats_vs_read_speed": last["float64"]["stats_vs_read_speed"],
        "mixed_vs_float64_speed": last["mixed"]["gb_per_s"] / last["float64"]["gb_per_s"],
        "peak_rss_mb": last["mixed"]["peak_rss_mb"],
        "memory_growth_ratio": last["mixed"]["peak_rss_mb"] / max(first["mixed"]["peak_rss_mb"], 1e-9),
        "data_growth_ratio": last["gb"] / first["gb"],
    }
    print(f"\nstatistics pass, d_model {args.d_model}, {args.tokens_per_partition:,} tokens per partition")
    print("  partitions      GB   read GB/s  co-moment  stats GB/s  stats/read  peak RSS MB (read / stats)")
    for row in rows:
        for precision in PRECISIONS:
            cell = row[precision]
            print(
                f"  {row['partitions']:10d} {row['gb']:7.3f} {row['read_gb_per_s']:11.3f} {precision:>10s} "
                f"{cell['gb_per_s']:11.3f} {cell['stats_vs_read_speed']:11.2f}  "
                f"{row['read_peak_rss_mb']:8.0f} / {cell['peak_rss_mb']:.0f}"
            )
    print(
        f"  mixed co-moment {figures['mixed_vs_float64_speed']:.2f}x the float64 pass; largest difference from "
        f"float64: {last['mixed_max_relative_difference']:.1e} of sqrt(var_i var_j)"
    )
    print(f"  data grew {figures['data_growth_ratio']:.1f}x, stats peak memory {figures['memory_growth_ratio']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

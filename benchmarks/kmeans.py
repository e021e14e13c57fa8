"""K-means benchmark: the project's torch k-means against scikit-learn and faiss, same process.

    python benchmarks/kmeans.py --json benchmarks/results/kmeans_cpu.json [--demo-data data/demo]

Same data, same initial centroids, same iteration count for all three, on (a) a synthetic
Gaussian mixture (N=65536, D=2304, k=256) and (b) stored demo activations when a demo
store is given. Figures: speedup_vs_sklearn (sklearn KMeans(algorithm="lloyd") seconds /
ours), speedup_vs_faiss (faiss.Kmeans with max_points_per_centroid high enough to use every
point / ours), inertia_rel_diff_vs_sklearn, and out_of_core_peak_rss_mb: peak RSS growth of a
streamed fit over a zarr store at least 4x larger than the memory budget given to it.
Each method is timed `--repeats` times after a warm-up of ours (which loads the compiled
Elkan kernel) and the median is reported; the headline speedups are the worst over the runs.
Each run also times ours with Hamerly's bounds only (what a fit gets when Elkan's n x k bounds
exceed its memory budget): hamerly_only_speedup_vs_sklearn.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stats import write_store  # noqa: E402
from gemma_assets.core.kmeans import fit_kmeans  # noqa: E402
from gemma_assets.core.memory import RssTrace  # noqa: E402
from gemma_assets.core.storage import ActivationStore  # noqa: E402


def gaussian_mixture(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)).astype(np.float32) * 2
    return centres[rng.integers(k, size=n)] + rng.normal(size=(n, d)).astype(np.float32)


def median_seconds(run, repeats: int):
    """Median wall time of `repeats` calls of run(), and the last call's result."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return float(np.median(times)), result


def compare(name: str, x: np.ndarray, k: int, iterations: int, repeats: int, seed: int = 0) -> dict:
    import faiss
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    init = x[rng.choice(len(x), k, replace=False)].copy()
    xt, init_t = torch.from_numpy(x), torch.from_numpy(init)
    fit_kmeans(xt[: 4 * k], k, max_iter=1, tol=0.0, init=init_t)  # loads (or compiles, once) the Elkan kernel

    ours_seconds, ours = median_seconds(lambda: fit_kmeans(xt, k, max_iter=iterations, tol=0.0, init=init_t), repeats)
    hamerly_seconds, _ = median_seconds(  # the fallback when Elkan's bounds exceed the memory budget
        lambda: fit_kmeans(xt, k, max_iter=iterations, tol=0.0, init=init_t, bounds_mb=0), repeats
    )
    sklearn_seconds, reference = median_seconds(
        lambda: KMeans(k, init=init, n_init=1, max_iter=iterations, tol=0.0, algorithm="lloyd").fit(x), repeats
    )

    def faiss_fit():
        index_kmeans = faiss.Kmeans(
            x.shape[1], k, niter=iterations, seed=seed, max_points_per_centroid=len(x) // k + 1, verbose=False
        )
        index_kmeans.train(x, init_centroids=init)

    faiss_seconds, _ = median_seconds(faiss_fit, repeats)

    row = {
        "data": name,
        "n": len(x),
        "d": x.shape[1],
        "k": k,
        "iterations": iterations,
        "repeats": repeats,
        "ours_seconds": ours_seconds,
        "sklearn_seconds": sklearn_seconds,
        "faiss_seconds": faiss_seconds,
        "speedup_vs_sklearn": sklearn_seconds / ours_seconds,
        "speedup_vs_faiss": faiss_seconds / ours_seconds,
        "ours_inertia": ours.inertia_curve[-1],
        "sklearn_inertia": float(reference.inertia_),
        "hamerly_only_seconds": hamerly_seconds,
        "hamerly_only_speedup_vs_sklearn": sklearn_seconds / hamerly_seconds,
        "inertia_rel_diff_vs_sklearn": abs(ours.inertia_curve[-1] - reference.inertia_) / reference.inertia_,
        "distances_skipped_share": ours.distances_skipped_share,
    }
    print(
        f"  {name:24s} ours {ours_seconds:7.2f}s  sklearn {sklearn_seconds:7.2f}s ({row['speedup_vs_sklearn']:.2f}x)  "
        f"faiss {faiss_seconds:7.2f}s ({row['speedup_vs_faiss']:.2f}x)  inertia rel diff {row['inertia_rel_diff_vs_sklearn']:.1e}  "
        f"bounds skipped {row['distances_skipped_share']:.0%} of distances  "
        f"(Hamerly only: {hamerly_seconds:.2f}s, {row['hamerly_only_speedup_vs_sklearn']:.2f}x sklearn)",
        flush=True,
    )
    return row


def out_of_core_child(budget_mb: int, factor: int, k: int, iterations: int, d: int = 640) -> dict:
    """One streamed fit over a store `factor` times the budget (run in its own process)."""
    tokens_per_partition = 1 << 15
    n_partitions = int(np.ceil(factor * budget_mb * 2**20 / (tokens_per_partition * d * 4)))
    with tempfile.TemporaryDirectory() as scratch:
        store = write_store(Path(scratch), n_partitions, tokens_per_partition, d)
        keys = store.committed_keys()
        batch_tokens = budget_mb * 2**20 // 8 // (4 * d)

        def batches():
            return (x for x, _ in store.iter_tokens(keys, batch_tokens=batch_tokens, exclude_bos=False))

        # the compiled kernel's runtime (~50 MB) is a per-process cost like torch's, not per token
        warm = torch.randn(4 * k, d)
        fit_kmeans(warm, k, max_iter=1, init=warm[:k])
        with RssTrace() as rss:
            fit_kmeans(
                batches,
                k,
                max_iter=iterations,
                tol=0.0,
                seed=0,
                init_sample_rows=budget_mb * 2**20 // 4 // (4 * d),
                bounds_mb=budget_mb / 4,
            )
    return {"data_float32_mb": n_partitions * tokens_per_partition * d * 4 / 2**20, "peak_rss_mb": rss.mb}


def out_of_core(budget_mb: int, k: int, iterations: int) -> dict:
    """Streamed fits over stores 4x and 8x the budget (batches of budget/8, a k-means++ sample
    of budget/4, Elkan bounds within budget/4), each in a fresh process whose allocator returns freed buffers to the system
    (MALLOC_MMAP_THRESHOLD_), so RSS follows live memory. It should stay flat as data doubles."""
    runs = []
    for factor in (4, 8):
        child = subprocess.run(
            [sys.executable, __file__, "--out-of-core-child", f"{budget_mb},{factor},{k},{iterations}"],
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
            capture_output=True,
            text=True,
            check=True,
        )
        run = json.loads(child.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(
            f"  out-of-core: {run['data_float32_mb']:.0f} MB of float32 data, budget {budget_mb} MB, "
            f"peak RSS growth {run['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    return {
        "budget_mb": budget_mb,
        "out_of_core_runs": runs,
        "out_of_core_peak_rss_mb": runs[0]["peak_rss_mb"],
        "out_of_core_memory_growth_ratio": runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per method; the median is reported")
    parser.add_argument("--demo-data", type=Path, help="a demo profile folder (data/demo) with stored activations")
    parser.add_argument("--budget-mb", type=int, default=128)
    parser.add_argument("--out-of-core-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out_of_core_child:
        print(json.dumps(out_of_core_child(*map(int, args.out_of_core_child.split(",")))))
        return
    print(
        f"k-means benchmark on {torch.get_num_threads()} torch threads (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')})"
    )
    rows = [
        compare("synthetic mixture", gaussian_mixture(args.n, args.d, args.k), args.k, args.iterations, args.repeats)
    ]
    if args.demo_data:
        store = ActivationStore(str(args.demo_data))
        x, _ = store.load_tokens(store.committed_keys())
        x = (x - x.mean(0)).numpy()
        rows.append(
            compare("demo activations (centred)", np.ascontiguousarray(x), args.k, args.iterations, args.repeats)
        )
    figures = {
        "runs": rows,
        "speedup_vs_sklearn": min(r["speedup_vs_sklearn"] for r in rows),
        "speedup_vs_faiss": min(r["speedup_vs_faiss"] for r in rows),
        "inertia_rel_diff_vs_sklearn": max(r["inertia_rel_diff_vs_sklearn"] for r in rows),
        **out_of_core(args.budget_mb, 64, 3),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

"""The store passes on Dask: speed-up with workers, per-worker memory, and network bytes.

    python benchmarks/dask_cluster.py --json benchmarks/results/dask_cluster_cpu.json

Writes a synthetic store at d 2304 (benchmarks/stats.py's, with massive dimensions) and runs
the two passes the fits spend their time in, as map-reduce over partitions (core/engine.py):
k-means Lloyd iterations from fixed centroids, and the statistics pass. Each runs on a
LocalCluster of one single-threaded worker process (the baseline, in the same process) and of
two. Targets (issue #26):

- with 2 workers, Lloyd and statistics run at least 1.7x as fast as with 1;
- per-worker peak RSS is flat (at most 1.25x) from N to 4N tokens;
- the bytes sent per Lloyd iteration grow as k * d and do not depend on N (both ways: the
  centroids to each worker, each worker's float64 sums back).

For context it also times the statistics pass with no Dask at all: the same partition tasks in
one and in two plain single-threaded processes, their results not moved. That ratio is what
this machine's cores allow (memory bandwidth, cache and the reading thread, which one busy
process leaves a core free for, share them), printed beside Dask's.

And the CPU an idle 2-worker LocalCluster burns (fraction of a core over 10 s: this process's
scheduler, nannies and client, and the workers) with Dask's default housekeeping and with the
engine's settings (core/engine.py, `_local_cluster_settings`): on two cores, what two busy
workers lose to it.

The statistics pass runs --repeats times for each worker count, alternating 1 and 2 (one pass
varies by ~7% from run to run here); its speed-up is the median of the paired ratios.

Needs the `bench` extra (Dask). Worker peak RSS is each worker process's high-water mark
(VmHWM) during the passes, reset after its imports, on a fresh cluster per measurement (Linux).
The workers' imports run before the clock starts: the targets are about the passes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stats import write_store  # noqa: E402
from gemma_assets.core.engine import DaskEngine, InProcess, Partitioned, Traffic, open_engine  # noqa: E402
from gemma_assets.core.kmeans import fit_kmeans  # noqa: E402
from gemma_assets.core.stats import ActivationMoments, compute_partition_stats  # noqa: E402
from gemma_assets.core.storage import ActivationStore  # noqa: E402

TARGET_SPEEDUP = 1.7
TARGET_RSS_GROWTH = 1.25
# the statistics pass as both baselines run it: quantile sample per partition, co-moment precision, device
STATISTICS_SETTINGS = (2048, "mixed", "cpu")


def _warm_up() -> None:
    """A fresh worker's imports and its first torch call, outside the timed passes."""
    import gemma_assets.core.kmeans  # noqa: F401
    import gemma_assets.core.stats  # noqa: F401

    torch.ones(64, 64) @ torch.ones(64, 64)


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the high-water mark restarts from now


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _ready(engine: DaskEngine) -> None:
    engine.client.run(_warm_up)
    engine.client.run(_reset_peak_rss)


def lloyd(store: ActivationStore, keys: list[str], workers: int, k: int, iterations: int) -> dict:
    """Lloyd passes from fixed centroids (rows of the data) on a fresh cluster: seconds per pass,
    bytes per pass, peak RSS of the busiest worker during the passes (imports excluded)."""
    init = torch.cat([x for x, _ in store.iter_tokens(keys[:1])])[::7][:k].contiguous()
    with open_engine("local", workers) as engine:
        assert isinstance(engine, DaskEngine)
        _ready(engine)
        engine.traffic = traffic = Traffic()
        data = Partitioned.of(engine, store, keys)
        started = time.perf_counter()
        result = fit_kmeans(data, k, max_iter=iterations, tol=0.0, init=init)
        seconds = time.perf_counter() - started
        passes = result.n_iter + 1
        rss = max(engine.client.run(_peak_rss_mb).values())
        return {
            "workers": workers,
            "tokens": int(result.sizes.sum()),
            "k": k,
            "seconds_per_pass": seconds / passes,
            "bytes_sent_per_pass": traffic.sent / passes,
            "bytes_received_per_pass": traffic.received / passes,
            "bytes_per_pass": (traffic.sent + traffic.received) / passes,
            "worker_peak_rss_mb": rss,
        }


def statistics(store: ActivationStore, keys: list[str], workers: int) -> dict:
    """The statistics pass (moments, norms, quantile sample) over `keys`, merged here in order."""
    with open_engine("local", workers) as engine:
        assert isinstance(engine, DaskEngine)
        _ready(engine)
        shards = Partitioned.of(engine, store, keys).shards
        started = time.perf_counter()
        total = ActivationMoments(2304)
        for part in engine.imap(compute_partition_stats, shards, *STATISTICS_SETTINGS):
            total.merge(part.moments)
        return {"workers": workers, "tokens": total.count, "seconds": time.perf_counter() - started}


def _idle_cores(client, seconds: float) -> float:
    """Cores busy in this process and the client's workers while no task runs."""

    def total() -> float:
        return time.process_time() + sum(client.run(time.process_time).values())

    time.sleep(2)  # past the workers' start
    before, started = total(), time.perf_counter()
    time.sleep(seconds)
    return (total() - before) / (time.perf_counter() - started)


def idle_cluster_cores(seconds: float) -> dict:
    """An idle 2-worker LocalCluster's CPU, with Dask's defaults and with the engine's settings."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.WARNING
        ) as cluster,
        Client(cluster) as client,
    ):
        defaults = _idle_cores(client, seconds)
    with open_engine("local", 2) as engine:
        assert isinstance(engine, DaskEngine)
        settings = _idle_cores(engine.client, seconds)
    return {"dask defaults": defaults, "engine settings": settings}


def _plain_process(barrier) -> None:
    """A process of the no-Dask baseline: one thread for torch and BLAS, as a Dask worker's."""
    from threadpoolctl import threadpool_limits

    global _BARRIER
    _BARRIER = barrier
    torch.set_num_threads(1)
    threadpool_limits(1)
    _warm_up()


def _all_ready(_: int) -> None:
    _BARRIER.wait()  # every process holds one of these at once: each is started and warm


def _partition_tokens(shard) -> int:
    return compute_partition_stats(shard, *STATISTICS_SETTINGS).moments.count


def plain_statistics(store: ActivationStore, keys: list[str], processes: int) -> dict:
    """The statistics pass's partition tasks in `processes` plain processes, no Dask, nothing
    returned but a count: what the cores give the pass's computing alone."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    shards = Partitioned.of(InProcess(), store, keys).shards
    with context.Pool(processes, _plain_process, (context.Barrier(processes),)) as pool:
        pool.map(_all_ready, range(processes), chunksize=1)
        started = time.perf_counter()
        tokens = sum(pool.map(_partition_tokens, shards, chunksize=1))
        return {"processes": processes, "tokens": tokens, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    # partitions of the research profile hold 262,144 tokens; a quarter of a million here would
    # take this 2-core machine half an hour, so smaller ones, big enough that a partition's work
    # outweighs moving its result (a statistics result holds the upper triangle of a d x d float64
    # co-moment, 21 MB)
    parser.add_argument("--tokens-per-partition", type=int, default=32768)
    parser.add_argument("--partitions", type=int, default=8, help="N: the small store's partitions (4N: the large)")
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="statistics passes per worker count (one pass varies by ~7%% run to run)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        store = write_store(Path(scratch), 4 * args.partitions, args.tokens_per_partition, 2304)
        keys = store.committed_keys()
        small = keys[: args.partitions]
        one, two = (lloyd(store, small, workers, args.k, args.iterations) for workers in (1, 2))
        large = lloyd(store, keys, 2, args.k, args.iterations)
        wider = lloyd(store, small, 2, 2 * args.k, args.iterations)
        # alternated, so that a slow spell of the machine weighs on both sides of a ratio
        repeats = [[statistics(store, small, workers) for workers in (1, 2)] for _ in range(args.repeats)]
        plain_one, plain_two = (plain_statistics(store, small[: args.partitions // 2], n) for n in (1, 2))
    idle = idle_cluster_cores(10)
    figures = {
        "d_model": 2304,
        "tokens_per_partition": args.tokens_per_partition,
        "lloyd": {"1 worker": one, "2 workers": two, "2 workers, 4N": large, "2 workers, 2k": wider},
        "statistics": {"1 worker": [one for one, _ in repeats], "2 workers": [two for _, two in repeats]},
        "lloyd_speedup_2_workers": one["seconds_per_pass"] / two["seconds_per_pass"],
        "statistics_speedups_2_workers": [one["seconds"] / two["seconds"] for one, two in repeats],
        "statistics_without_dask": {"1 process": plain_one, "2 processes": plain_two},
        "statistics_speedup_2_processes_without_dask": plain_one["seconds"] / plain_two["seconds"],
        "idle_cluster_cores": idle,
        "idle_cluster_cpu_ratio_to_dask_defaults": idle["engine settings"] / idle["dask defaults"],
        "worker_rss_growth_4n": large["worker_peak_rss_mb"] / two["worker_peak_rss_mb"],
        "bytes_per_pass_growth_4n": large["bytes_per_pass"] / two["bytes_per_pass"],
        "bytes_per_pass_growth_2k": wider["bytes_per_pass"] / two["bytes_per_pass"],
    }
    figures["statistics_speedup_2_workers"] = median(figures["statistics_speedups_2_workers"])
    figures["targets_met"] = {
        "lloyd_speedup": figures["lloyd_speedup_2_workers"] >= TARGET_SPEEDUP,
        "statistics_speedup": figures["statistics_speedup_2_workers"] >= TARGET_SPEEDUP,
        "flat_worker_rss": figures["worker_rss_growth_4n"] <= TARGET_RSS_GROWTH,
        # N-independent: within 5% (a task's partition list grows with N, by ~100 B a partition)
        "bytes_independent_of_n": abs(figures["bytes_per_pass_growth_4n"] - 1) <= 0.05,
        "bytes_proportional_to_k": abs(figures["bytes_per_pass_growth_2k"] - 2) <= 0.1,
    }
    print(f"\nstore passes on a LocalCluster, d 2304, {args.tokens_per_partition:,} tokens per partition")
    print("  pass         workers  tokens     k   s/pass  sent/pass MB  received/pass MB  worker peak RSS MB")
    for name, row in figures["lloyd"].items():
        print(
            f"  Lloyd {name:>14s} {row['tokens']:8,d} {row['k']:5d} {row['seconds_per_pass']:8.2f} "
            f"{row['bytes_sent_per_pass'] / 1e6:13.2f} {row['bytes_received_per_pass'] / 1e6:17.2f} "
            f"{row['worker_peak_rss_mb']:19.0f}"
        )
    for name, rows in figures["statistics"].items():
        seconds = ", ".join(f"{row['seconds']:.2f}" for row in rows)
        print(f"  statistics {name:>9s} {rows[0]['tokens']:8,d}       {seconds} s (repeats)")
    print(
        f"  2 workers vs 1: Lloyd {figures['lloyd_speedup_2_workers']:.2f}x, statistics "
        f"{figures['statistics_speedup_2_workers']:.2f}x, the median of "
        f"{', '.join(f'{ratio:.2f}' for ratio in figures['statistics_speedups_2_workers'])} (target >= {TARGET_SPEEDUP}x)"
    )
    print(
        f"  no Dask, statistics tasks in plain single-threaded processes: 1 process "
        f"{plain_one['seconds']:.2f} s, 2 processes {plain_two['seconds']:.2f} s "
        f"({plain_one['tokens']:,d} tokens): "
        f"{figures['statistics_speedup_2_processes_without_dask']:.2f}x, what this machine's cores allow"
    )
    print(
        f"  idle 2-worker cluster: {idle['dask defaults']:.1%} of a core with Dask's defaults, "
        f"{idle['engine settings']:.1%} with the engine's settings "
        f"({figures['idle_cluster_cpu_ratio_to_dask_defaults']:.2f}x)"
    )
    print(
        f"  4N tokens: worker peak RSS {figures['worker_rss_growth_4n']:.2f}x (target <= {TARGET_RSS_GROWTH}x), "
        f"bytes per pass {figures['bytes_per_pass_growth_4n']:.2f}x; 2k: bytes per pass "
        f"{figures['bytes_per_pass_growth_2k']:.2f}x"
    )
    print(f"  targets met: {figures['targets_met']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

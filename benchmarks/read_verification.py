"""Cost of verified reads: CRC32 of every chunk against the manifest before its first use.

    python benchmarks/read_verification.py --json benchmarks/results/read_verification_cpu.json

Writes synthetic bf16 partitions (the same generator as benchmarks/stats.py) at d 640 and
d 2304 and reads every activation chunk three ways in one process: through plain zarr (no
check: the baseline), through the store's verified reader with an empty verification cache
(every chunk checksummed: a first read), and again with the cache warm (later reads in the
same process). Each figure is the median of 3 passes, in wall-clock seconds and in the
process's CPU seconds (zarr decodes on a pool of threads, so the wall clock hides a cost that
a busy machine, or a Dask worker of one thread, pays). Ratios are verified / unverified (1.0 =
free).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zarr
import zarr.storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stats import write_store  # noqa: E402
from gemma_assets.core import storage  # noqa: E402


def _read_plain(store: storage.ActivationStore, keys: list[str]) -> None:
    for key in keys:
        version = store.manifest(key)["version"]
        group = zarr.open_group(zarr.storage.LocalStore(store._path(f"part-{key}", version), read_only=True), mode="r")
        group["activations"][:]


def _read_verified(store: storage.ActivationStore, keys: list[str], cold: bool) -> None:
    if cold:
        storage._VERIFIED.clear()
    for key in keys:
        store.open(key).array("activations")


def _median_seconds(read, repeats: int = 3) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of `read` over `repeats` passes."""
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        read()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--mb", type=int, default=256, help="bf16 activation megabytes per d_model")
    args = parser.parse_args()
    rows = []
    for d_model in (640, 2304):
        tokens = args.mb * 2**20 // (2 * d_model) // 4 // 128 * 128  # whole windows of 128
        with tempfile.TemporaryDirectory() as scratch:
            store = write_store(Path(scratch), 4, tokens, d_model)
            keys = store.committed_keys()
            _read_verified(store, keys, cold=True)  # page cache and zarr imports warm for all three
            plain = _median_seconds(lambda: _read_plain(store, keys))
            first = _median_seconds(lambda: _read_verified(store, keys, cold=True))
            later = _median_seconds(lambda: _read_verified(store, keys, cold=False))
        gb = 4 * tokens * d_model * 2 / 1e9
        rows.append(
            {
                "d_model": d_model,
                "gb_bf16": gb,
                "unverified_gb_per_s": gb / plain[0],
                "verified_first_read_gb_per_s": gb / first[0],
                "verified_later_read_gb_per_s": gb / later[0],
                "first_read_cost_ratio": first[0] / plain[0],
                "later_read_cost_ratio": later[0] / plain[0],
                "unverified_cpu_seconds_per_gb": plain[1] / gb,
                "verified_first_read_cpu_seconds_per_gb": first[1] / gb,
                "verified_later_read_cpu_seconds_per_gb": later[1] / gb,
                "first_read_cpu_ratio": first[1] / plain[1],
                "later_read_cpu_ratio": later[1] / plain[1],
            }
        )
    print("| d_model | GB | read | zarr, unverified | store, first read | ratio | store, later reads | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['d_model']} | {r['gb_bf16']:.2f} | GB/s (wall) | {r['unverified_gb_per_s']:.2f} | "
            f"{r['verified_first_read_gb_per_s']:.2f} | {r['first_read_cost_ratio']:.3f}x | "
            f"{r['verified_later_read_gb_per_s']:.2f} | {r['later_read_cost_ratio']:.3f}x |"
        )
        print(
            f"| {r['d_model']} | {r['gb_bf16']:.2f} | CPU s per GB | {r['unverified_cpu_seconds_per_gb']:.2f} | "
            f"{r['verified_first_read_cpu_seconds_per_gb']:.2f} | {r['first_read_cpu_ratio']:.3f}x | "
            f"{r['verified_later_read_cpu_seconds_per_gb']:.2f} | {r['later_read_cpu_ratio']:.3f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "repeats": 3}, indent=1))


if __name__ == "__main__":
    main()

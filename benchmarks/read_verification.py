"""Cost of verified reads: CRC32 of every chunk against the manifest before its first use.

    python benchmarks/read_verification.py --json benchmarks/results/read_verification_cpu.json

Writes synthetic bf16 partitions (the same generator as benchmarks/stats.py) at d 640 and
d 2304 and reads every activation chunk three ways in one process: through plain zarr (no
check: the baseline), through the store's verified reader with an empty verification cache
(every chunk checksummed: a first read), and again with the cache warm (later reads in the
same process). Each figure is the median of 3 passes; the ratio is verified / unverified
seconds (1.0 = free).
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


def _median_seconds(read, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


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
                "unverified_gb_per_s": gb / plain,
                "verified_first_read_gb_per_s": gb / first,
                "verified_later_read_gb_per_s": gb / later,
                "first_read_cost_ratio": first / plain,
                "later_read_cost_ratio": later / plain,
            }
        )
    print("| d_model | GB | unverified GB/s | verified, first read | ratio | verified, later reads | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['d_model']} | {r['gb_bf16']:.2f} | {r['unverified_gb_per_s']:.2f} | "
            f"{r['verified_first_read_gb_per_s']:.2f} | {r['first_read_cost_ratio']:.3f}x | "
            f"{r['verified_later_read_gb_per_s']:.2f} | {r['later_read_cost_ratio']:.3f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "repeats": 3}, indent=1))


if __name__ == "__main__":
    main()

"""Progress reporting overhead on a k-means fit: the fit with the run log's listeners against
the same fit with nobody listening (a report is then one attribute test), in one process.

    python benchmarks/progress_overhead.py --json benchmarks/results/progress_overhead_cpu.json

The listeners are what a Dagster step installs (`defs.common.reports_progress`): the run log's
rate-limited lines, here formatted and dropped, and the per-task summary for the metadata.
Fits alternate between the two arms so that drift in the machine's speed hits both; the table
gives the fastest of each and the ratio, with the spread of each arm. As that ratio is within the fits' own noise, the
reports' cost is also measured directly: calls per fit times the cost of one call, over the
fit's time. Target: under 1% overhead. Needs only the package.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gemma_assets.core import progress  # noqa: E402
from gemma_assets.core.kmeans import fit_kmeans  # noqa: E402


def fit_seconds(x: torch.Tensor, k: int, max_iter: int, listening: bool) -> tuple[float, int]:
    """Wall time of one fit, and the lines the run log would have got."""
    lines: list[str] = []
    to_log = progress.Throttled(lambda update: lines.append(update.line()), every_s=10)
    started = time.perf_counter()
    if listening:
        with progress.reporting(to_log, step="cluster_models"), progress.reporting(progress.Summary()):
            fit_kmeans(x, k, max_iter=max_iter, tol=0.0, seed=0)
    else:
        fit_kmeans(x, k, max_iter=max_iter, tol=0.0, seed=0)
    return time.perf_counter() - started, len(lines)


class Counting:
    """A listener that counts the updates sent to it."""

    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, update: progress.Update) -> None:
        self.sent += 1


def seconds_per_report(calls: int = 200_000) -> float:
    """What one `update` costs a loop with the run log's listeners installed: mostly a clock read
    (updates within Task.EVERY_S of the last one sent go no further)."""
    to_log = progress.Throttled(lambda update: update.line(), every_s=10)
    with progress.reporting(to_log, step="bench"), progress.reporting(progress.Summary()):
        task = progress.task("loop", calls).start()
        started = time.perf_counter()
        for i in range(calls):
            task.update(i)
        return (time.perf_counter() - started) / calls


def reports_per_fit(x: torch.Tensor, k: int, max_iter: int) -> int:
    """How many times the fit calls its tasks (every update, sent or not)."""
    calls = 0
    original = progress.Task.update

    def counted(self: progress.Task, position: float, **figures: float) -> None:
        nonlocal calls
        calls += 1
        original(self, position, **figures)

    progress.Task.update = counted  # type: ignore[method-assign]
    try:
        with progress.reporting(Counting()):
            fit_kmeans(x, k, max_iter=max_iter, tol=0.0, seed=0)
    finally:
        progress.Task.update = original  # type: ignore[method-assign]
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--max-iter", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    x = torch.randn(args.tokens, args.d, generator=torch.Generator().manual_seed(0))
    fit_seconds(x, args.k, 2, True)  # warm-up: kernels, allocator
    quiet, listened, lines = [], [], 0
    for _ in range(args.repeats):
        quiet.append(fit_seconds(x, args.k, args.max_iter, False)[0])
        seconds, lines = fit_seconds(x, args.k, args.max_iter, True)
        listened.append(seconds)
    # the fastest of each arm: the run least disturbed by the rest of the machine
    baseline, reported = min(quiet), min(listened)
    per_report, calls = seconds_per_report(), reports_per_fit(x, args.k, args.max_iter)
    result = {
        "shape": {"tokens": args.tokens, "d": args.d, "k": args.k, "lloyd_iterations": args.max_iter},
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "seconds_without_listeners": baseline,
        "seconds_with_listeners": reported,
        "spread_without_listeners": max(quiet) / baseline - 1,
        "spread_with_listeners": max(listened) / reported - 1,
        "overhead": reported / baseline - 1,
        "run_log_lines_per_fit": lines,
        "reports_per_fit": calls,
        "seconds_per_report": per_report,
        # what the reports themselves cost, free of the fit's run-to-run noise
        "overhead_bound": calls * per_report / baseline,
        "target_overhead": 0.01,
    }
    print(
        f"k-means fit: {args.tokens:,} tokens x d {args.d}, k {args.k}, {args.max_iter} Lloyd iterations, "
        f"fastest of {args.repeats} alternating fits, {torch.get_num_threads()} threads"
    )
    print("| arm | seconds | ratio |\n|---|---|---|")
    print(f"| nobody listening (baseline) | {baseline:.3f} | 1.000 |")
    print(f"| run log + summary listening | {reported:.3f} | {reported / baseline:.3f} |")
    print(
        f"overhead {100 * result['overhead']:+.2f}% (target < 1%; the arms' own spread "
        f"{100 * result['spread_without_listeners']:.1f}% and {100 * result['spread_with_listeners']:.1f}%); "
        f"{lines} run-log line(s) per fit"
    )
    print(
        f"{calls} reports per fit at {per_report * 1e6:.2f} us each: "
        f"{100 * result['overhead_bound']:.4f}% of the fit (the reports' own cost)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The cost model of a run: how each asset's work scales with the run config, and the estimate
of a full run from measured slices of it (`gemma-assets preflight`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gemma_assets.core.config import RunConfig


@dataclass(frozen=True)
class Scaling:
    """An asset's amount of work in a run, in `unit`s, and why time should follow it."""

    units: float
    unit: str
    assumption: str


def asset_work(run: RunConfig) -> dict[str, Scaling]:
    """Per asset, the quantity its time is taken to be linear in. Everything not listed as a
    unit (d_model, k, widths, seeds' count, iterations) is the same in a slice and its full run,
    so it cancels in the ratio."""
    sample = run.sampling
    tokens = sample.n_windows * sample.context_len
    heldout_windows = sample.holdout_partitions * sample.windows_per_partition
    heldout_tokens = heldout_windows * (sample.context_len - 1)
    trained = any(spec.architecture == "topk" for spec in run.sae_specs)
    return {
        "pile_sample": Scaling(tokens, "tokens", "linear in sampled tokens (tokenising the chosen documents)"),
        "activations": Scaling(tokens, "tokens", "linear in tokens: forward to the block, copy, compress, write"),
        "activation_stats": Scaling(tokens, "tokens", "linear in tokens: one pass, d^2 work per token"),
        "whitening": Scaling(heldout_tokens, "tokens", "linear in held-out tokens (the identity check) plus a d^3 fit"),
        "leader_clusters": Scaling(run.train_tokens, "tokens", "linear in train tokens (one pass, leaders fixed)"),
        "sae_dictionary": Scaling(
            run.train_tokens * run.saes.train_epochs if trained else 1,
            "token-epochs" if trained else "loads",
            "linear in train tokens x epochs, at every SAE width and seed"
            if trained
            else "constant: pretrained SAEs are loaded, nothing is trained",
        ),
        "sae_evaluation": Scaling(heldout_tokens, "tokens", "linear in held-out tokens, at every SAE width"),
        "cluster_models": Scaling(
            run.train_tokens,
            "tokens",
            "linear in train tokens at every k and seed, at the slice's iteration counts (a slice holds few "
            "tokens per cluster and converges sooner: up to clustering.max_iter Lloyd iterations may follow)",
        ),
        "cluster_density": Scaling(
            run.train_tokens,
            "tokens",
            "linear in train tokens at the slice's EM iterations (up to density.max_iter may follow)",
        ),
        "downstream_loss": Scaling(
            min(run.evaluation.ce_windows, heldout_windows),
            "windows",
            "linear in spliced windows: one forward past the block per dictionary",
        ),
        "interpretation": Scaling(
            min(run.evaluation.interpret_tokens, heldout_tokens), "tokens", "linear in interpreted tokens"
        ),
        "comparison_report": Scaling(1, "reports", "constant: tables and plots over the dictionaries"),
    }


@dataclass(frozen=True)
class Measured:
    """One asset's execution in a slice."""

    asset: str
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int
    units: float
    unit: str
    # the process's RSS when the asset started: the peak minus it is what the asset itself added
    start_rss_bytes: int = field(default=0, kw_only=True)

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_rss_bytes - self.start_rss_bytes)

    @property
    def throughput(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class Estimate(Measured):
    """One asset of the full run, as the slices predict it, and the scaling assumption behind it."""

    assumption: str


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """A fixed part and a slope through the measured (units, value) points: through the origin
    from one point, the least-squares line from several, both kept non-negative."""
    units, value = max(points)
    through_origin = (0.0, value / units if units else 0.0)
    if len({u for u, _ in points}) < 2:
        return through_origin
    n = len(points)
    mean_u = sum(u for u, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    slope = sum((u - mean_u) * (v - mean_v) for u, v in points) / sum((u - mean_u) ** 2 for u, _ in points)
    if slope <= 0 or mean_v - slope * mean_u < 0:  # noise over the per-unit cost: keep the upper bound
        return through_origin
    return mean_v - slope * mean_u, slope


def extrapolate(points: list[tuple[float, float]], at: float) -> float:
    fixed, slope = _line(points)
    return fixed + slope * at


def streamed_train(run: RunConfig, d_model: int) -> bool:
    """Whether k-means streams the train split from the store (it does not fit in_memory_mb)."""
    return run.train_tokens * d_model * 4 > run.clustering.in_memory_mb * 2**20


def kmeans_fits(run: RunConfig) -> int:
    """Lloyd fits per run: k-means and spherical k-means (gain-shape) for every k and seed."""
    return 2 * len(run.clustering.ks) * run.seeds


def estimate(
    slices: list[list[Measured]], full: RunConfig, d_model: int, sliced_streams: bool = False
) -> list[Estimate]:
    """The full run's per-asset time and memory from one or more measured slices.

    Time: fixed + slope x units, fitted through the slices (one slice: through the origin, an
    upper bound, since fixed costs such as model loads are scaled too). Where the full run's
    train split is too large for clustering.in_memory_mb and the slices' was not, k-means
    streams it from the store on every Lloyd iteration: each of those reads is added at the
    read rate the statistics pass measured (max_iter per fit, an upper bound). Memory: with
    several slices the same line in units; with one, the slice's peak (flat in N, true of the
    streamed passes; in-memory fits grow with their train split up to in_memory_mb)."""
    work = asset_work(full)
    read_rates = [m.throughput for measured in slices for m in measured if m.asset == "activation_stats"]
    estimates = []
    for asset, scaling in work.items():
        runs = [m for measured in slices for m in measured if m.asset == asset]
        if not runs:
            continue
        seconds = extrapolate([(m.units, m.seconds) for m in runs], scaling.units)
        assumption = scaling.assumption
        if asset == "cluster_models" and streamed_train(full, d_model) and not sliced_streams and read_rates:
            reads = kmeans_fits(full) * full.clustering.max_iter
            seconds += reads * full.train_tokens / max(read_rates)
            assumption += (
                f"; plus {reads} streamed reads of the train split (it exceeds in_memory_mb="
                f"{full.clustering.in_memory_mb}) at the statistics pass's read rate"
            )
        # later slices run in a process that earlier ones grew: the first slice's starting RSS
        # is the baseline a full run has, and only what the asset adds scales
        first = runs[0]
        if len(slices) > 1:
            growth = extrapolate([(m.units, m.growth_bytes) for m in runs], scaling.units)
            rss = max(first.start_rss_bytes + growth, first.peak_rss_bytes)
            memory_note = "memory: the RSS the asset adds, on a line through the slices"
        else:
            rss = first.peak_rss_bytes
            memory_note = "memory: the slice's peak"
        estimates.append(
            Estimate(
                asset,
                seconds,
                int(rss),
                max(m.peak_gpu_bytes for m in runs),
                scaling.units,
                scaling.unit,
                f"{assumption}; {memory_note}",
                start_rss_bytes=first.start_rss_bytes,
            )
        )
    return estimates


# How a run's files grow: by category, what they hold and the quantity their size is linear in
DISK_GROWTH = {
    "store": "the activation store: linear in tokens",
    "per_token": "the token sample and the cluster of every token: linear in tokens",
    "per_heldout_window": "per-window metric sums (the bootstrap's input): linear in held-out windows",
    "per_partition": "statistics of each partition (d x d moments): linear in partitions",
    "fixed": "centroids, SAE weights, whitening, feature pages, report: constant in tokens",
}


def disk_category(relative: Path) -> str:
    """The DISK_GROWTH category of a file at `relative` under a run's root (core/layout's names)."""
    parts = relative.parts
    if parts[0] == "activations":
        return "store"
    if parts[0] == "sample" or "assignments" in parts:
        return "per_token"
    if relative.name in ("windows.npz", "evaluation_windows.npz"):
        return "per_heldout_window"
    if parts[0] == "stats" and relative.name.startswith("part-"):
        return "per_partition"
    return "fixed"


def disk_use(root: Path) -> dict[str, int]:
    """Bytes of the files under a run's root, by DISK_GROWTH category."""
    use = dict.fromkeys(DISK_GROWTH, 0)
    for path in root.rglob("*"):
        if path.is_file():
            use[disk_category(path.relative_to(root))] += path.stat().st_size
    return use


def disk_units(run: RunConfig) -> dict[str, float]:
    """The quantity each DISK_GROWTH category is linear in, for `run`."""
    sample = run.sampling
    tokens = sample.n_windows * sample.context_len
    return {
        "store": tokens,
        "per_token": tokens,
        "per_heldout_window": sample.holdout_partitions * sample.windows_per_partition,
        "per_partition": sample.partitions,
        "fixed": 1,
    }


def disk_estimate(slices: list[tuple[RunConfig, dict[str, int]]], full: RunConfig) -> dict[str, float]:
    """The full run's bytes per DISK_GROWTH category, through the slices' (units, bytes)."""
    at = disk_units(full)
    return {
        category: extrapolate([(disk_units(run)[category], use[category]) for run, use in slices], at[category])
        for category in DISK_GROWTH
    }

"""The cost model of a run: how each asset's work scales with the run config, the estimate of a
full run from measured slices of it (`gemma-assets preflight`), and its disk need from the run
config alone (what `gemma-assets materialize` checks the free space against)."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemma_assets.core import itda, kmeans, model
from gemma_assets.core.config import RunConfig, SaeSpec
from gemma_assets.core.dictionaries import TOP_M
from gemma_assets.core.files import write_json
from gemma_assets.core.storage import ActivationStore


@dataclass(frozen=True)
class Scaling:
    """An asset's amount of work in a run, in `unit`s, and why time should follow it."""

    units: float
    unit: str
    assumption: str
    # the progress units of the asset's tasks whose work the dictionaries' widths set, not `units`:
    # a slice has the full run's widths, so their time is kept as measured (see `estimate`)
    width_units: tuple[str, ...] = ()


def asset_work(run: RunConfig) -> dict[str, Scaling]:
    """Per asset, the quantity its time is taken to be linear in. Everything not listed as a
    unit (d_model, k, widths, seeds' count, iterations) is the same in a slice and its full run,
    so it cancels in the ratio."""
    sample = run.sampling
    tokens = sample.n_windows * sample.context_len
    heldout_windows = sample.holdout_partitions * sample.windows_per_partition
    heldout_tokens = heldout_windows * (sample.context_len - 1)
    trained = any(spec.is_trained for spec in run.sae_specs)
    return {
        "pile_sample": Scaling(tokens, "tokens", "linear in sampled tokens (tokenising the chosen documents)"),
        "activations": Scaling(tokens, "tokens", "linear in tokens: forward to the block, copy, compress, write"),
        "activation_stats": Scaling(tokens, "tokens", "linear in tokens: one pass, d^2 work per token"),
        "whitening": Scaling(heldout_tokens, "tokens", "linear in held-out tokens (the identity check) plus a d^3 fit"),
        "leader_clusters": Scaling(run.train_tokens, "tokens", "linear in train tokens (one pass, leaders fixed)"),
        "itda_dictionaries": Scaling(
            run.train_tokens,
            "tokens",
            "linear in train tokens per pass, at every ITDA width and L0 (a pass stops once its dictionary is full; "
            "a full run's larger split may fill it in fewer passes)",
        ),
        "sae_dictionary": Scaling(
            run.train_tokens * run.saes.trainer.epochs if trained else 1,
            "token-epochs" if trained else "loads",
            "linear in train tokens x epochs (one pass trains every SAE), at every SAE width and seed"
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
            min(run.evaluation.interpret_tokens, heldout_tokens),
            "tokens",
            "linear in interpreted tokens, but for the alignments and the feature pages: set by the dictionaries' "
            "widths, they are kept as measured (scaled by their FLOPs where the full run's k or logit effects differ)",
            width_units=("cosines", "features"),
        ),
        "quantisation_shift": Scaling(
            min(run.evaluation.ce_windows, heldout_windows),
            "windows",
            "linear in compared windows: the unquantised model's forward to the block, each pretrained SAE twice",
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
    # of `seconds`, those of the tasks whose work the widths set (Scaling.width_units), and that
    # work's FLOPs at the slice's shapes (`width_flops`)
    width_seconds: float = field(default=0.0, kw_only=True)
    width_flops: float = field(default=0.0, kw_only=True)

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
    slices: list[list[Measured]],
    full: RunConfig,
    d_model: int,
    sliced_streams: bool = False,
    vocab: int | None = None,
) -> list[Estimate]:
    """The full run's per-asset time and memory from one or more measured slices.

    Time: fixed + slope x units, fitted through the slices (one slice: through the origin, an
    upper bound, since fixed costs such as model loads are scaled too). The tasks whose work the
    dictionaries' widths set (the alignments of 16k centroids with 65k latents, whatever the
    tokens) are left out of that line and added as the last slice measured them, times the ratio
    of the full run's `width_flops` to the slice's: where a slice clipped a k or rehearses fewer
    logit effects, the rest of that work runs at the rate the slice achieved on it (the feature
    pages' writing lowers that rate: conservative). Where the full run's
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
        seconds = extrapolate([(m.units, m.seconds - m.width_seconds) for m in runs], scaling.units)
        last = runs[-1]
        if last.width_seconds:
            ratio = width_flops(full, d_model, vocab) / last.width_flops if last.width_flops else 1.0
            seconds += last.width_seconds * ratio
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


def disk_use(root: Path, allocated: bool = False) -> dict[str, int]:
    """Bytes of the files under a run's root, by DISK_GROWTH category: their sizes, or with
    `allocated` the blocks the filesystem gives them (what its free space is counted in)."""
    use = dict.fromkeys(DISK_GROWTH, 0)
    for path in root.rglob("*"):
        if path.is_file():
            stat = path.stat()
            use[disk_category(path.relative_to(root))] += stat.st_blocks * 512 if allocated else stat.st_size
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


# What `gemma-assets materialize` holds the free space of the data root against, before it
# plans anything. preflight measures every category on slices (disk_estimate) and records the
# result beside the run (record_disk_estimate); without such a record the bytes are counted
# from the run config alone (config_disk_estimate): exact for uncompressed arrays, an upper
# bound for what is stored with a lossless codec, and an allowance for text (pages, reports).
BFLOAT16_BYTES = 2
# the per-token arrays stored beside the activations (zstd; counted uncompressed): token ids and
# positions (int32), document ids and offsets (int64), strata (int16)
STORE_PER_TOKEN_BYTES = 4 + 4 + 8 + 8 + 2
# the token sample (sample/windows.npz): token ids (int32) per token; document id and start
# (int64) and stratum (int16) per window
SAMPLE_PER_TOKEN_BYTES, SAMPLE_PER_WINDOW_BYTES = 4, 8 + 8 + 2
ASSIGNMENT_BYTES = 4  # the cluster of every token at each k (int32, zstd; counted uncompressed)
WINDOW_METRIC_SUMS = 6  # per dictionary and held-out window: n, sse, sq, cosine, relative norm, l0 (+ d sums of x)
# per partition, besides its d x d co-moment: norms (float32), positions (int32), strata (int16)
STATS_PER_TOKEN_BYTES = 4 + 4 + 2
FEATURE_PAGE_BYTES = 8 * 2**10  # one HTML page per feature: 4.0 KB on the tiny run, 6.4 KB in 4 KiB blocks
REPORT_BYTES = 2**20  # report, plots, records, JSON summaries: 0.6 MB on the tiny run
OFFLINE_CORPUS_BYTES = int(3.5 * 2**20)  # the whole offline corpus (1,208 documents, 3.2 MB on Python 3.11)
OFFLINE_DOCUMENT_BYTES = 3 * 2**10  # of it, per document when corpus.max_documents caps it (2.5 KB measured)
PRETRAINED_WIDTH = 16384  # a pretrained SAE whose sae_id names no width_<n>[k|m] is counted at this width
# the local copies `core/model` makes under DATA_ROOT/models once (the hub model stays in the
# Hugging Face cache): the tiny model with its tokenizer (1.6 MB), Gemma 3 270M in float32
MODEL_COPY_BYTES = {"tiny": 2 * 2**20, "gguf_demo": int(1.15e9)}
PREFLIGHT_ESTIMATE_FILE = "preflight_estimate.json"  # in the run's folder: what preflight estimated
CONFIG_SOURCE = "estimate from the run config"
PREFLIGHT_SOURCE = "preflight's estimate"


def _pretrained_width(sae_id: str) -> int:
    match = re.search(r"width_(\d+)([km]?)", sae_id)
    if match is None:
        return PRETRAINED_WIDTH
    return int(match.group(1)) * {"": 1, "k": 2**10, "m": 2**20}[match.group(2)]


def config_disk_estimate(run: RunConfig, d_model: int) -> dict[str, float]:
    """The bytes of `run`'s folder per DISK_GROWTH category, from the run config and the model's
    d_model alone (no slice is run): the activation store as d_model bfloat16 values per token
    (written with a lossless codec: the uncompressed size is an upper bound), the per-token arrays
    beside it, in the sample and k-means' assignments at every k, each partition's statistics
    (its d x d float64 co-moment, quantile sample and per-token columns), the per-window metric
    sums of every dictionary, and fixed costs: moments and whitening, centroids, SAE weights, ITDA
    atoms, one feature page per cluster, latent and ITDA atom, the offline corpus and the report."""
    sample = run.sampling
    tokens = sample.n_windows * sample.context_len
    heldout_windows = sample.holdout_partitions * sample.windows_per_partition
    tokens_per_partition = sample.tokens_per_partition
    non_bos_per_partition = sample.windows_per_partition * (sample.context_len - 1)
    ks = run.clustering.ks
    itda_shapes = itda.itda_shapes(run)
    # k-means, gain-shape, top-m; leader x2; ITDA; SAEs
    dictionaries = len(ks) * (2 + len(TOP_M)) + 2 + len(itda_shapes) + len(run.sae_specs)
    d2 = d_model * d_model * 8  # one float64 d x d matrix
    per_partition = (
        d2
        + 4 * d_model * 8  # mean, minimum, maximum, and as much again for the norm histogram
        + min(run.quality.quantile_sample_per_partition, non_bos_per_partition) * d_model * 4
        + tokens_per_partition * STATS_PER_TOKEN_BYTES
        + sample.windows_per_partition * 16
    )
    widths = {spec.name: spec.width if spec.is_trained else _pretrained_width(spec.sae_id) for spec in run.sae_specs}
    sae_weights = sum(
        (run.seeds if spec.is_trained else 1) * (2 * widths[spec.name] * d_model + widths[spec.name] + d_model) * 4
        for spec in run.sae_specs
    )
    corpus = 0
    if run.corpus.kind == "offline":
        capped = run.corpus.max_documents * OFFLINE_DOCUMENT_BYTES
        corpus = min(OFFLINE_CORPUS_BYTES, capped) if capped else OFFLINE_CORPUS_BYTES
    fixed = (
        3 * d2  # train and held-out moments, whitening
        + sum(2 * k * d_model * 4 * run.seeds for k in ks)  # centroids and gain-shape atoms, per seed
        + 2 * max(ks) * d_model * 4  # leader regions, counted as many as the largest k
        + sae_weights
        + sum(width * d_model * 4 for width, _ in itda_shapes)  # ITDA atoms
        + (sum(ks) + sum(widths.values()) + sum(width for width, _ in itda_shapes)) * FEATURE_PAGE_BYTES
        + corpus
        + REPORT_BYTES
    )
    return {
        "store": tokens * (d_model * BFLOAT16_BYTES + STORE_PER_TOKEN_BYTES),
        "per_token": tokens * (SAMPLE_PER_TOKEN_BYTES + len(ks) * ASSIGNMENT_BYTES)
        + sample.n_windows * SAMPLE_PER_WINDOW_BYTES,
        "per_heldout_window": heldout_windows * dictionaries * (WINDOW_METRIC_SUMS + d_model) * 8,
        "per_partition": sample.partitions * per_partition,
        "fixed": fixed,
    }


def record_disk_estimate(run_root: Path, run: RunConfig, disk: dict[str, float]) -> Path:
    """Keep preflight's disk estimate of `run` in its folder, for `gemma-assets materialize`."""
    target = run_root / PREFLIGHT_ESTIMATE_FILE
    write_json(target, {"config_digest": run.digest(), "disk_bytes": disk})
    return target


def recorded_disk_estimate(run_root: Path, run: RunConfig) -> dict[str, float] | None:
    """preflight's disk estimate of this very config (the same digest), if one was recorded."""
    try:
        recorded = json.loads((run_root / PREFLIGHT_ESTIMATE_FILE).read_text())
        if recorded["config_digest"] != run.digest():
            return None
        return {category: float(recorded["disk_bytes"][category]) for category in DISK_GROWTH}
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable or of another version: count instead
        return None


def model_copy_bytes(run: RunConfig, models_dir: Path) -> float:
    """The local copy of the run's model still to write under DATA_ROOT/models (0: made already,
    or the model is read from the Hugging Face cache)."""
    if run.model.kind not in MODEL_COPY_BYTES:
        return 0.0
    folder = model.local_copy_folder(run.model, models_dir)
    return 0.0 if (folder / "config.json").exists() else float(MODEL_COPY_BYTES[run.model.kind])


def format_bytes(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n_bytes) < 1024:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TB"


@dataclass(frozen=True)
class DiskNeed:
    """What a run takes on the data root's disk in all, what is there already, and what it still
    needs to write."""

    total: float  # the run's folder and the model's local copy, when done
    present: float  # bytes allocated under the run's folder now
    remaining: float  # what the run still writes, per category less what each already holds
    source: str  # PREFLIGHT_SOURCE or CONFIG_SOURCE

    def describe(self) -> str:
        basis = (
            "an upper bound: activations and assignments counted uncompressed"
            if self.source == CONFIG_SOURCE
            else "measured on slices and extrapolated"
        )
        return (
            f"about {format_bytes(self.total)} in all ({self.source}, {basis}), {format_bytes(self.remaining)} "
            f"still to write ({format_bytes(self.present)} of the run already on disk)"
        )


def disk_need(run: RunConfig, d_model: int, run_root: Path, models_dir: Path) -> DiskNeed:
    """The run's disk need: preflight's recorded estimate of this config when there is one,
    else the estimate from the run config; less what the run's folder already holds, category
    by category, so a rerun of a half-finished run needs only the rest. The activation store
    counts its committed partitions instead of its bytes (what is compressed on disk would
    otherwise leave a finished store's uncompressed bound still to write)."""
    recorded = recorded_disk_estimate(run_root, run)
    estimate = recorded if recorded is not None else config_disk_estimate(run, d_model)
    present = disk_use(run_root, allocated=True)
    keys = run.partition_keys
    committed = len(set(keys) & set(ActivationStore(str(run_root)).committed_keys()))
    remaining = {category: max(0.0, estimate[category] - present[category]) for category in DISK_GROWTH}
    remaining["store"] = estimate["store"] * (len(keys) - committed) / len(keys)
    copy = model_copy_bytes(run, models_dir)
    return DiskNeed(
        total=sum(estimate.values()) + copy,
        present=float(sum(present.values())),
        remaining=sum(remaining.values()) + copy,
        source=PREFLIGHT_SOURCE if recorded is not None else CONFIG_SOURCE,
    )


def free_bytes(path: Path) -> int:
    """Free space on the filesystem of `path` (of its nearest existing folder if it is not there yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# stages longer than this on the machine are named before a preflight starts them
LONG_STAGE_S = 600.0
# what turns each long stage into a rehearsal: iteration counts and page counts, never a shape
REHEARSAL_SETS = {
    "cluster_models": ("clustering.max_iter=1", "clustering.seeding=random"),
    "cluster_density": ("density.max_iter=1",),
    "interpretation": ("evaluation.logit_effect_features=64",),
}


@dataclass(frozen=True)
class MachineRates:
    """Float32 FLOP/s of this machine on the two shapes the fits run: a GEMM with both sides wide
    (Lloyd's distances, EM, logit effects) and one with a skinny side (k-means++'s candidates,
    memory-bound)."""

    gemm: float
    skinny: float

    @classmethod
    def measure(cls, d: int = 2304, rows: int = 8192, wide: int = 1024, trials: int = 11) -> MachineRates:
        x = torch.randn(rows, d)

        def rate(other: torch.Tensor) -> float:
            x @ other  # warm-up
            started = time.perf_counter()
            repeats = 3
            for _ in range(repeats):
                x @ other
            return repeats * 2 * rows * d * other.shape[1] / (time.perf_counter() - started)

        return cls(gemm=rate(torch.randn(d, wide)), skinny=rate(torch.randn(d, trials)))


@dataclass(frozen=True)
class StageWork:
    """The arithmetic of one asset at a config's shapes, and what it comes from."""

    asset: str
    gemm_flops: float
    skinny_flops: float
    what: str

    def seconds(self, rates: MachineRates) -> float:
        return self.gemm_flops / rates.gemm + self.skinny_flops / rates.skinny


def stage_work(run: RunConfig, d_model: int, vocab: int | None) -> list[StageWork]:
    """FLOPs of the stages whose arithmetic grows with k, iterations and dictionary widths (the
    others are linear in tokens at a few d^2 per token), at `run`'s shapes and iteration counts:
    upper bounds (every Lloyd and EM iteration runs, no distance is skipped)."""
    spec, n, d = run.clustering, run.train_tokens, d_model
    fits = run.seeds * 2  # k-means and spherical k-means, per seed
    seeding = lloyd = 0.0
    for k in spec.ks:
        sample = min(kmeans.INIT_SAMPLE_ROWS, n)
        trials = 2 + math.log(k)
        if spec.seeding == "k-means++":
            seeding += fits * k * trials * sample * d * 2
        elif spec.seeding == "k-means||":  # oversampling rounds, then k-means++ over the candidates they drew
            drawn = kmeans.OVERSAMPLING * k  # candidates per round
            rounds = kmeans.PARALLEL_ROUNDS
            seeding += fits * (rounds * sample * drawn * d * 2 + k * trials * min(sample, rounds * drawn) * d * 2)
        lloyd += fits * (spec.max_iter + 1) * n * k * d * 2
    em_components = min(run.density.components, d)
    em = sum((run.density.max_iter + 2) * n * k * em_components * 8 for k in spec.ks)
    work = [
        StageWork(
            "cluster_models",
            lloyd,
            seeding,
            f"k in {list(spec.ks)}, {spec.seeding} seeding, up to {spec.max_iter} Lloyd iterations over "
            f"{n:,} train tokens, {fits} fits per k",
        ),
        StageWork(
            "cluster_density",
            em,
            0.0,
            f"EM with k components in {em_components} dimensions, up to {run.density.max_iter} iterations",
        ),
    ]
    if vocab is not None:
        features = logit_effect_directions(run)
        work.append(
            StageWork(
                "interpretation",
                width_flops(run, d, vocab),
                0.0,
                f"logit effects of {features:,} feature directions through a {vocab:,}-token unembedding",
            )
        )
    return work


def interpreted_latent_widths(run: RunConfig) -> list[int]:
    """Widths of the dictionaries interpretation sets beside the k-means clusters (aligns with each
    k's centroids, writes feature pages for): every SAE and every ITDA dictionary."""
    return [*(sae_width(sae) for sae in run.sae_specs), *(width for width, _ in itda.itda_shapes(run))]


def logit_effect_directions(run: RunConfig) -> int:
    """Feature directions whose logit effects the feature pages show, over every dictionary."""
    per_dictionary = run.evaluation.logit_effect_features
    widths = [*run.clustering.ks, *interpreted_latent_widths(run)]
    return sum(min(per_dictionary, w) if per_dictionary else w for w in widths)


def width_flops(run: RunConfig, d_model: int, vocab: int | None) -> float:
    """FLOPs of interpretation's work that the dictionaries' widths set, not the tokens: every
    k-means centroid against every SAE latent and ITDA atom, each refit against its seed-0
    dictionary, and (with `vocab`) the logit effects through the unembedding."""
    trained = [sae_width(sae) for sae in run.sae_specs if sae.is_trained]
    cosines = sum(k * width for k in run.clustering.ks for width in interpreted_latent_widths(run))
    cosines += (run.seeds - 1) * sum(w * w for w in [*run.clustering.ks, *trained])
    logit_effects = logit_effect_directions(run) * vocab if vocab else 0
    return 2.0 * d_model * (cosines + logit_effects)


def sae_width(spec: SaeSpec) -> int:
    """Latents of an SAE: its configured width, or the width its Gemma Scope id names."""
    if spec.width:
        return spec.width
    return _pretrained_width(spec.sae_id) if spec.sae_id else 0

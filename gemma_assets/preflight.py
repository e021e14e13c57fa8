"""`gemma-assets preflight`: the whole asset graph of a run config on small slices of it, each
asset measured (wall time, peak RSS, peak GPU memory, throughput), then an estimate of the full
run built from those measurements (`core/costs.py`).

A slice keeps everything of the config that sets a shape (model, layer, every k, every SAE,
seeds, epochs) and shrinks only what is counted in tokens: one held-out partition, at most
SLICE_TRAIN_PARTITIONS train partitions of just enough windows for the largest k, a window of
spliced CE and the held-out tokens for interpretation. Slices live in DATA_ROOT/preflight with
their own Dagster instance; the model cache (DATA_ROOT/models) is shared with real runs.

With --workers/--gpus it runs nothing: the run is counted over N GPUs and M Dask workers
(`core/fleet_costs.py`).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dagster as dg
import torch

from gemma_assets.core import costs, fleet_costs, progress
from gemma_assets.core.config import ConfigError, RunConfig, save_resolved
from gemma_assets.core.files import write_json
from gemma_assets.core.layout import RunLayout
from gemma_assets.core.memory import RssTrace

SLICE_TRAIN_PARTITIONS = 16  # more, smaller partitions: the largest k fits with fewer held-out tokens
MIN_WINDOWS = 4  # held-out probes test on odd windows, and their bootstrap needs two of them
CE_WINDOWS = 1  # per point: each window is 1 + dictionaries forwards past the block and through the unembedding


@dataclass(frozen=True)
class SlicePlan:
    run: RunConfig
    clipped: tuple[str, ...]  # one message per k the slice cannot hold


def slice_of(run: RunConfig, windows: int | None = None, point: int = 1) -> SlicePlan:
    """The `point`-th slice of `run` (point 2 holds twice the windows of point 1)."""
    sample = run.sampling
    train_partitions = min(len(run.train_partition_keys), SLICE_TRAIN_PARTITIONS)
    per_window = sample.context_len - 1  # BOS is never fitted on
    needed = math.ceil(max(run.clustering.ks) / (train_partitions * per_window))
    if windows is not None and windows < MIN_WINDOWS:
        raise ConfigError(
            f"--windows {windows} is too few: the held-out probes test on odd windows and their bootstrap needs "
            f"two of them -> pass --windows {MIN_WINDOWS} or more, or leave it out"
        )
    base = windows or max(MIN_WINDOWS, needed)
    per_partition = base * point
    train_tokens = train_partitions * per_partition * per_window
    kept = [k for k in run.clustering.ks if k <= train_tokens]
    clipped = tuple(
        f"k={k} is not rehearsed: the slice holds {train_tokens:,} train tokens ({train_partitions} partitions x "
        f"{per_partition} windows x {per_window}), fewer than k -> leave --windows out, or pass --windows "
        f"{math.ceil(k / (train_partitions * per_window))} or more"
        for k in run.clustering.ks
        if k > train_tokens
    )
    if not kept:
        raise ConfigError(f"no k fits the slice: {clipped[0]}")
    data = run.model_dump(mode="json")
    data["sampling"] |= {
        "partitions": train_partitions + 1,
        "windows_per_partition": per_partition,
        "holdout_partitions": 1,
    }
    data["clustering"]["ks"] = kept
    heldout_tokens = per_partition * per_window
    evaluation = data["evaluation"]
    evaluation["ce_windows"] = min(run.evaluation.ce_windows, CE_WINDOWS * point, per_partition)
    evaluation["ce_batch_windows"] = min(run.evaluation.ce_batch_windows, evaluation["ce_windows"])
    evaluation["interpret_tokens"] = min(run.evaluation.interpret_tokens, heldout_tokens)
    evaluation["probe_tokens"] = min(run.evaluation.probe_tokens, evaluation["interpret_tokens"])
    return SlicePlan(RunConfig.model_validate(data), clipped)


@dataclass
class Meter:
    """Wraps each Dagster execution: resets the CUDA peak and records it (one per execution:
    the assets of one execution share it), and keeps the last report of every progress task."""

    gpu_peaks: dict[str, int] = field(default_factory=dict)
    finished: list[progress.Update] = field(default_factory=list)

    @contextmanager
    def __call__(self, run_id: str) -> Iterator[None]:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            with progress.reporting(self._keep_finished):
                yield
        finally:
            self.gpu_peaks[run_id] = torch.cuda.max_memory_reserved() if cuda else 0

    def _keep_finished(self, update: progress.Update) -> None:
        if update.final:
            self.finished.append(update)

    def seconds_in(self, step: str, units: Sequence[str]) -> float:
        """Wall time of the step's tasks that count in `units`."""
        return sum(u.elapsed_s for u in self.finished if u.step == step and u.unit in units)


def _step_windows(instance: dg.DagsterInstance, run_id: str) -> dict[str, list[tuple[float, float]]]:
    """Per step (= asset) of a run, its (start, end) wall-clock times."""
    starts: dict[str, float] = {}
    windows: dict[str, list[tuple[float, float]]] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or entry.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            windows.setdefault(entry.step_key, []).append(
                (starts.pop(entry.step_key, entry.timestamp), entry.timestamp)
            )
    return windows


@dataclass
class SliceResult:
    run: RunConfig
    seconds: float
    measured: list[costs.Measured]
    disk: dict[str, int]  # bytes by costs.DISK_GROWTH category
    facts: dict

    def to_json(self) -> dict:
        sample = self.run.sampling
        return {
            "partitions": sample.partitions,
            "windows_per_partition": sample.windows_per_partition,
            "tokens": sample.n_windows * sample.context_len,
            "train_tokens": self.run.train_tokens,
            "ks": list(self.run.clustering.ks),
            "ce_windows": self.run.evaluation.ce_windows,
            "interpret_tokens": self.run.evaluation.interpret_tokens,
            "seconds": self.seconds,
            "disk_bytes": self.disk,
            "assets": [asdict(m) | {"throughput_per_s": m.throughput} for m in self.measured],
            **self.facts,
        }


def run_slice(
    plan: SlicePlan,
    data_root: Path,
    models_dir: Path,
    log_level: str,
    debug: bool = False,
    warn: Callable[[str], None] = lambda _: None,
) -> SliceResult:
    """Materialise every asset of the slice from scratch in `data_root` and measure each; what
    the validation warns of goes to `warn`."""
    from gemma_assets.core.validation import validate_run
    from gemma_assets.defs.graph import build_definitions
    from gemma_assets.runner import materialize_all

    run = plan.run
    shutil.rmtree(data_root, ignore_errors=True)  # a measurement starts from nothing
    data_root.mkdir(parents=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    (data_root / "models").symlink_to(models_dir.resolve(), target_is_directory=True)
    home = data_root / "dagster"
    home.mkdir()
    os.environ["DAGSTER_HOME"] = str(home)
    if Path("dagster.yaml").exists():
        shutil.copy("dagster.yaml", home / "dagster.yaml")
    layout = RunLayout.of(data_root, run.name)
    architecture = validate_run(run, layout.models_dir, warn)
    defs = build_definitions(run, str(data_root))
    save_resolved(run, layout.resolved_config_file)
    started = time.perf_counter()
    with dg.DagsterInstance.from_config(str(home)) as instance, RssTrace(interval=0.05) as trace:
        meter = Meter()
        results = materialize_all(run, defs, instance, log_level, debug=debug, meter=meter)
        seconds = time.perf_counter() - started
        work = costs.asset_work(run)
        totals: dict[str, list[float]] = {}
        for result in results:
            for asset, spans in _step_windows(instance, result.run_id).items():
                row = totals.setdefault(asset, [0.0, 0, 0, trace.at(spans[0][0])])
                row[0] += sum(end - start for start, end in spans)
                row[1] = max(row[1], max(trace.peak_between(start, end) for start, end in spans))
                row[2] = max(row[2], meter.gpu_peaks[result.run_id])
    width_flops = costs.width_flops(run, architecture.d_model, architecture.vocab)
    measured = [
        costs.Measured(
            asset,
            row[0],
            int(row[1]),
            int(row[2]),
            work[asset].units,
            work[asset].unit,
            start_rss_bytes=int(row[3]),
            width_seconds=meter.seconds_in(asset, work[asset].width_units),
            width_flops=width_flops if work[asset].width_units else 0.0,
        )
        for asset, row in totals.items()
        if asset in work
    ]
    facts = _report_facts(layout, run) | {
        "d_model": architecture.d_model,
        "n_layers": architecture.n_layers,
        "vocab": architecture.vocab,
    }
    return SliceResult(run, seconds, measured, costs.disk_use(layout.root), facts)


def _value(cell):
    return cell["value"] if isinstance(cell, dict) else cell


def _report_facts(layout: RunLayout, run: RunConfig) -> dict:
    """What the slice's report says ran: its dictionaries with held-out L0 and FVU, and the
    pretrained SAEs with how they were loaded (or why an optional one was skipped)."""
    report_json = layout.report_file("report.json")
    rows = json.loads(report_json.read_text())["dictionaries"] if report_json.exists() else []
    pretrained = {spec.name: spec for spec in run.sae_specs if spec.architecture == "pretrained"}
    dictionaries = [
        {
            "name": row["name"],
            "family": row["family"],
            "features": row["k"],
            "heldout_l0": _value(row.get("heldout_l0")),
            "heldout_fvu": _value(row.get("heldout_fvu")),
            "delta_ce": _value(row.get("delta_ce")),
        }
        for row in rows
    ]
    measured = {d["name"]: d for d in dictionaries}
    skipped = layout.sae_skipped()
    return {
        "layer": run.model.layer,
        "model": run.model.name,
        "report": str(layout.report_file("report.md")) if layout.report_file("report.md").exists() else None,
        "report_json": str(report_json) if report_json.exists() else None,
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE") == "1",
        "dictionaries": dictionaries,
        "pretrained_saes": [
            {
                "name": name,
                "release": spec.release,
                "sae_id": spec.sae_id,
                "path": spec.path,
                "loaded_with": "SAE.load_from_disk" if spec.path else "SAE.from_pretrained",
                "skipped": skipped.get(name),  # why an optional SAE was not loaded; None: it was
                **{key: measured.get(name, {}).get(key) for key in ("features", "heldout_l0", "heldout_fvu")},
            }
            for name, spec in pretrained.items()
        ],
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def measured_table(result: SliceResult) -> str:
    lines = [
        "| asset | seconds | peak RSS | peak GPU | throughput |",
        "|---|---|---|---|---|",
    ]
    for m in result.measured:
        lines.append(
            f"| {m.asset} | {m.seconds:.1f} | {costs.format_bytes(m.peak_rss_bytes)} | {costs.format_bytes(m.peak_gpu_bytes) if m.peak_gpu_bytes else '-'}"
            f" | {_rate(m.throughput)} {m.unit}/s |"
        )
    return "\n".join(lines)


def estimate_table(estimates: list[costs.Estimate], disk: dict[str, float]) -> str:
    lines = ["| asset | time | peak RSS | peak GPU | work | scaling assumption |", "|---|---|---|---|---|---|"]
    for e in estimates:
        lines.append(
            f"| {e.asset} | {_duration(e.seconds)} | {costs.format_bytes(e.peak_rss_bytes)} | "
            f"{costs.format_bytes(e.peak_gpu_bytes) if e.peak_gpu_bytes else '-'} | {e.units:,.0f} {e.unit} | {e.assumption} |"
        )
    total = sum(e.seconds for e in estimates)
    peak = max((e.peak_rss_bytes for e in estimates), default=0)
    lines.append(
        f"| **all** | **{_duration(total)}** | **{costs.format_bytes(peak)}** | | | sum of the assets; peak of the peaks |"
    )
    lines += ["", "| on disk | size | scaling assumption |", "|---|---|---|"]
    lines += [
        f"| {category} | {costs.format_bytes(disk[category])} | {costs.DISK_GROWTH[category]} |" for category in disk
    ]
    lines.append(f"| **all** | **{costs.format_bytes(sum(disk.values()))}** | |")
    return "\n".join(lines)


def long_stage_warning(run: RunConfig, slices: list[RunConfig], data_root: Path, command: Sequence[str]) -> list[str]:
    """Lines naming each stage the slices will spend over costs.LONG_STAGE_S in on this machine
    (FLOPs at the slices' shapes and iteration counts over this machine's measured FLOP/s), and
    the command that rehearses the same shapes with fewer iterations; none when nothing is long."""
    from gemma_assets.core import model

    shape = model.architecture(run.model, data_root / "models")
    rates = costs.MachineRates.measure()
    seconds: dict[str, float] = {}
    what: dict[str, str] = {}
    for sliced in slices:
        for work in costs.stage_work(sliced, shape.d_model, shape.vocab):
            seconds[work.asset] = seconds.get(work.asset, 0.0) + work.seconds(rates)
            what[work.asset] = work.what
    long = [asset for asset, s in seconds.items() if s > costs.LONG_STAGE_S]
    if not long:
        return []
    lines = [
        f"gemma-assets preflight: warning: on this machine ({rates.gemm / 1e9:.0f} GFLOP/s float32 GEMM) "
        f"the slices will take long in {len(long)} stage(s), at most (every iteration run):"
    ]
    lines += [f"  {asset}: up to {seconds[asset] / 60:,.0f} min ({what[asset]})" for asset in long]
    sets = [s for asset in long for s in costs.REHEARSAL_SETS.get(asset, ())]
    typed = list(command)
    rehearsal = [*typed] if "--points" in typed or len(slices) == 1 else [*typed, "--points", "1"]
    rehearsal += [arg for s in sets if s not in typed for arg in ("--set", s)]
    lines.append(
        "  the same shapes with fewer iterations, a rehearsal of the code path: gemma-assets " + shlex.join(rehearsal)
    )
    return lines


def preflight(
    run: RunConfig,
    data_root: Path,
    points: int = 2,
    windows: int | None = None,
    json_path: Path | None = None,
    log_level: str = "WARNING",
    debug: bool = False,
    say: Callable[[str], None] = print,
    command: Sequence[str] = (),
) -> dict:
    """Run `points` slices of `run`, print what each asset measured and the full-run estimate;
    returns (and writes to `json_path`) everything as JSON. First, the stages the slices will
    take long over on this machine, and how `command` (the arguments as typed) becomes a rehearsal."""
    for line in long_stage_warning(
        run, [slice_of(run, windows, p).run for p in range(1, points + 1)], data_root, command
    ):
        say(line)
    slices: list[SliceResult] = []
    clipped: tuple[str, ...] = ()

    def warn_once(message: str) -> None:
        say(f"gemma-assets preflight: warning: {message}")

    for point in range(1, points + 1):
        plan = slice_of(run, windows, point)
        clipped = clipped or plan.clipped
        for message in plan.clipped if point == 1 else ():
            say(f"gemma-assets preflight: warning: {message}")
        sample = plan.run.sampling
        say(
            f"\nslice {point}/{points}: {sample.partitions} partitions x {sample.windows_per_partition} windows x "
            f"{sample.context_len} tokens, k in {list(plan.run.clustering.ks)}, {len(plan.run.sae_specs)} SAEs, "
            f"{plan.run.evaluation.ce_windows} spliced window(s) ..."
        )
        result = run_slice(
            plan,
            data_root / "preflight" / f"slice-{point}",
            data_root / "models",
            log_level,
            debug,
            warn=warn_once if point == 1 else lambda _: None,  # every slice validates the same SAEs
        )
        slices.append(result)
        say(f"slice {point}: every asset done in {result.seconds:.0f} s\n\n{measured_table(result)}")
    d_model = slices[0].facts["d_model"]
    estimates = costs.estimate(
        [s.measured for s in slices],
        run,
        d_model,
        costs.streamed_train(slices[0].run, d_model),
        slices[0].facts["vocab"],
    )
    disk = costs.disk_estimate([(s.run, s.disk) for s in slices], run)
    # `gemma-assets materialize` of this config checks the free space against it
    recorded = costs.record_disk_estimate(RunLayout.of(data_root, run.name).root, run, disk)
    sample = run.sampling
    say(
        f"\nestimate for the full run {run.name} ({sample.partitions} partitions x {sample.windows_per_partition} "
        f"windows x {sample.context_len} tokens, {run.evaluation.ce_windows} spliced windows) on this machine, "
        f"from {points} slice(s){'' if points > 1 else ' (one slice: fixed costs scale too, an upper bound)'}:\n\n"
        + estimate_table(estimates, disk)
    )
    document = {
        "run": run.name,
        "config_digest": run.digest(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "clipped": list(clipped),
        "slices": [s.to_json() for s in slices],
        "estimate": {
            "assets": [asdict(e) for e in estimates],
            "seconds": sum(e.seconds for e in estimates),
            "peak_rss_bytes": max((e.peak_rss_bytes for e in estimates), default=0),
            "store_bytes": disk["store"],
            "disk_bytes": disk,
            "points": points,
        },
    }
    say(f"\ndisk estimate recorded for gemma-assets materialize: {recorded}")
    if json_path is not None:
        write_json(json_path, document)
        say(f"\nJSON: {json_path}")
    sys.stdout.flush()
    return document


def fleet_table(plan: fleet_costs.FleetPlan, rates: fleet_costs.FleetRates) -> str:
    """The fleet plan as markdown: the stages, then the rates and what one worker holds and moves."""
    lines = [
        "| stage | passes | read | FLOP | wall clock | assumption |",
        "|---|---|---|---|---|---|",
    ]
    for stage in plan.stages:
        lines.append(
            f"| {stage.stage} | {f'{stage.store_passes:,.0f}' if stage.store_passes else '-'} | "
            f"{costs.format_bytes(stage.read_bytes)} | "
            f"{stage.flops:.3g} | {_duration(stage.seconds)} | {stage.assumption} |"
        )
    lines.append(f"| **all** | | | | **{_duration(plan.seconds)}** | the stages one after another |")
    per_iteration = plan.lloyd_bytes_to_each_worker + plan.lloyd_bytes_from_each_worker
    lines += [
        "",
        f"rates: {rates.gpu_tokens_per_s:,.0f} tokens/s per GPU (extraction), "
        f"{rates.worker_read_bytes_per_s / 1e9:.3g} GB/s store read and {rates.worker_flops / 1e9:,.0f} GFLOP/s "
        "float32 GEMM per worker",
        f"activation store: {costs.format_bytes(plan.store_bytes)} of bf16 ({plan.tokens:,} tokens x d {plan.d_model}), "
        f"{costs.format_bytes(plan.store_bytes / plan.workers)} read per worker per pass over it",
        f"network per Lloyd iteration at k = {plan.lloyd_k:,}: each worker receives "
        f"{costs.format_bytes(plan.lloyd_bytes_to_each_worker)} of float32 centroids and sends "
        f"{costs.format_bytes(plan.lloyd_bytes_from_each_worker)} of float64 sums and counts "
        f"({costs.format_bytes(per_iteration)} per worker); the client receives "
        f"{costs.format_bytes(plan.lloyd_bytes_at_client)} from {plan.workers} workers",
        f"memory per worker: {costs.format_bytes(plan.worker_memory_bytes)} of data (a decoded partition in bf16 "
        f"and float32, centroids and float64 sums at k = {plan.lloyd_k:,}, the d x d co-moment), "
        "plus the interpreter and torch",
    ]
    return "\n".join(lines)


def fleet_estimate(
    run: RunConfig,
    d_model: int,
    gpus: int,
    workers: int,
    rates: fleet_costs.FleetRates,
    json_path: Path | None = None,
    say: Callable[[str], None] = print,
) -> fleet_costs.FleetPlan:
    """Print (and write to `json_path`) the run's estimate over `gpus` GPUs and `workers` Dask workers."""
    plan = fleet_costs.fleet_plan(run, d_model, gpus, workers, rates)
    sample = run.sampling
    say(
        f"estimate for {run.name} ({sample.partitions:,} partitions x {sample.windows_per_partition:,} windows x "
        f"{sample.context_len} tokens, {sample.holdout_partitions:,} held out, k in {list(run.clustering.ks)}) "
        f"with extraction over {gpus} GPU(s) and the store passes over {workers} Dask worker(s), "
        f"every Lloyd and EM iteration counted:\n\n" + fleet_table(plan, rates)
    )
    if json_path is not None:
        write_json(json_path, {"run": run.name, "config_digest": run.digest(), "rates": asdict(rates)} | plan.to_json())
        say(f"\nJSON: {json_path}")
    return plan

"""The commands that read a finished run without running its graph: export one of its
dictionaries, verify its report in this numeric environment."""

from __future__ import annotations

import sys
from pathlib import Path

from gemma_assets.core.config import ConfigError, RunConfig
from gemma_assets.core.storage import StorageError
from gemma_assets.runner.errors import EXIT_DISAGREES, StageFailed


def export_dictionary(run_config: RunConfig, data_root: str, name: str, out: Path | None) -> str:
    """Write one dictionary of a finished run as an SAELens SAE folder; returns what to tell the user."""
    from gemma_assets.core import interop, methods, remote
    from gemma_assets.core.report import git_revision
    from gemma_assets.defs import graph  # noqa: F401 - registers the package's methods
    from gemma_assets.defs.resources import RunResource, StorageResource

    layout = StorageResource(data_root=data_root, run=RunResource.of(run_config)).layout()
    if layout.remote:  # the steps may have run on another machine: their artefacts come from the remote
        remote.pull(layout, remote.committed_assets(layout))
    try:
        member = methods.find_member(layout, run_config, methods.methods_of(run_config), name)
    except FileNotFoundError as error:  # a dictionary of a run that has not been materialised
        raise StorageError(str(error)) from None
    corpus = run_config.corpus
    metadata = {
        "model_name": run_config.model.name,
        "hook_name": run_config.model.hook_name,
        "hook_layer": run_config.model.layer,
        "context_size": run_config.sampling.context_len,
        "prepend_bos": True,
        "dataset_path": corpus.dataset or ", ".join(corpus.data_files) or "offline Pile-format corpus",
        "gemma_assets": {
            "run": run_config.name,
            "config_digest": run_config.digest(),
            "dictionary": member.name,
            "family": member.family.label(member.dictionary.n_features),
            "preprocessing": run_config.clustering.preprocessing,
            "train_partitions": run_config.train_partition_keys,
            "git_revision": git_revision(),
        },
    }
    folder = interop.export(member.dictionary, out or layout.export_dir(member.name), metadata)
    return (
        f"exported {member.name} ({member.family.label(member.dictionary.n_features)}) to {folder}\n"
        f"load it with: import gemma_assets.core.interop; from sae_lens import SAE; SAE.load_from_disk({str(folder)!r})"
    )


def verify_report(report_dir: Path, data_root: str, device: str, activations_url: str = "") -> str:
    """Recompute a report's held-out FVU, L0 and spliced CE here and print each beside the report's;
    returns the closing line, or raises StageFailed when a figure differs beyond its tolerance."""
    from gemma_assets.core import methods, model, verification
    from gemma_assets.core.environment import describe, numeric_environment
    from gemma_assets.defs import graph  # noqa: F401 - registers the package's methods
    from gemma_assets.defs.resources import ComputeResource
    from gemma_assets.runner.terminal import command_line_progress

    report = verification.ReportToVerify.open(report_dir, data_root, activations_url)
    run, layout, dtype = report.run, report.layout, report.forward_dtype
    compute = ComputeResource(device=device)
    try:
        here = numeric_environment(
            compute.resolved_device, dtype, compute.comoment_precision(run.quality.comoment_precision)
        )
    except ValueError as error:  # a device that is not here
        raise ConfigError(f"--device {device}: {error}") from None
    print(f"report {report_dir} (run {run.name}) was computed in: {describe(report.figures['numeric_environment'])}")
    print(f"recomputing in: {describe(here)}", flush=True)

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    try:
        members = methods.all_members(layout, run, methods.methods_of(run), compute.resolved_device)
    except FileNotFoundError as error:  # a dictionary of the run is gone from the data root
        raise StorageError(f"{error} -> rematerialise the run, or pass the data root that holds it") from None
    lm = model.load_model(layout.model_source(run), run.model.layer, compute.resolved_device, dtype)
    with command_line_progress(lines=True):
        recomputed = verification.recompute(report, members, lm, compute.resolved_device, log)
    agreements = verification.compare(report.reported(), recomputed, dtype, report.predictions, report.heldout_tokens)
    print(verification.table(agreements))
    differing = [a for a in agreements if not a.agrees]
    if differing:
        first = differing[0]
        raise StageFailed(
            f"{len(differing)} of {len(agreements)} figures differ from the report beyond their tolerance (first: "
            f"{first.figure} of {first.dictionary}, {first.reported:.8g} reported, {first.recomputed:.8g} here) -> "
            "the data root may not hold the activations and dictionaries this report was computed from; "
            "rematerialise the run, or compare the two numeric environments printed above",
            EXIT_DISAGREES,
        )
    return f"all {len(agreements)} figures agree with the report within their tolerances (docs/reproducibility.md)"

"""A run's store-pass steps in one process and on a 2-worker LocalCluster: every figure compared.

    python gemma_assets_tests/dask_equivalence.py demo data out/equivalence \
        --json benchmarks/results/dask_equivalence_demo.json

From a data root where the profile's sample, activations and SAEs are materialised (`data` after
`gemma-assets materialize --config demo`), copies those twice under OUT and runs the steps that
pass over the store there: statistics and whitening; leader clustering, ITDA and the SAE
evaluation; k-means and the GMM at every k. Once in each step's process, once with
GEMMA_ASSETS_DASK_CLUSTER=local and 2 workers. Prints the wall clock of each and the largest
relative differences of all figures. Issue #26's bar: statistics to 1e-12, fits to 1e-9.
A check, not a test: it takes minutes on the demo (the suite holds the tiny run to the same bar,
test_distributed.py). Dask comes with the `dev` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import numpy as np

from gemma_assets.core.config import RunConfig, load_run_config
from gemma_assets.core.layout import RunLayout
from gemma_assets.core.records import DictionaryRecord
from gemma_assets.defs.graph import build_definitions
from gemma_assets.defs.resources import DASK_CLUSTER_ENV_VAR, DASK_WORKERS_ENV_VAR

EVALUATION_FILES = ("evaluation.json", "windows.npz", "seeds.json")  # sae_evaluation's, rewritten by each copy


def materialise(profile: RunConfig, root: Path, cluster: str) -> RunLayout:
    """The steps that pass over the store, under `root`, with the compute resource's `cluster`."""
    os.environ[DASK_CLUSTER_ENV_VAR], os.environ[DASK_WORKERS_ENV_VAR] = cluster, "2"
    defs = build_definitions(profile, data_root=str(root))
    with dg.instance_for_test() as instance:
        analyse = defs.resolve_job_def("analyse")
        for selection in (
            ["activation_stats", "whitening"],
            ["leader_clusters", "itda_dictionaries", "sae_evaluation"],
        ):
            keys = [dg.AssetKey(asset) for asset in selection]
            assert analyse.execute_in_process(instance=instance, asset_selection=keys).success
        fits = defs.resolve_job_def("fit_cluster_models")
        for k in profile.clustering.ks:
            keys = [dg.AssetKey("cluster_models"), dg.AssetKey("cluster_density")]
            assert fits.execute_in_process(instance=instance, partition_key=str(k), asset_selection=keys).success
    return defs.resources["storage"].layout()


def copy_inputs(source: Path, target: Path, run: str) -> None:
    """The run's sample, activations and trained SAEs (not their evaluation), and the models."""
    shutil.rmtree(target, ignore_errors=True)
    for folder in ("sample", "activations"):
        shutil.copytree(source / run / folder, target / run / folder)
    saes = source / run / "saes"
    skipped = lambda folder, names: [n for n in names if Path(folder) == saes and n in EVALUATION_FILES]  # noqa: E731
    shutil.copytree(saes, target / run / "saes", ignore=skipped)
    shutil.copytree(source / "models", target / "models", symlinks=True)


def relative(reached, expected) -> float:
    reached, expected = np.asarray(reached, float), np.asarray(expected, float)
    both_nan = np.isnan(reached) & np.isnan(expected)
    gap = np.where(both_nan, 0.0, np.abs(reached - expected) / np.maximum(np.abs(expected), 1e-300))
    return float(gap.max()) if gap.size else 0.0


def differences(profile: RunConfig, here: RunLayout, there: RunLayout) -> dict[str, float]:
    """The largest relative difference of each figure (statistics, models, records), by name."""
    found: dict[str, float] = {}
    for split in ("train", "heldout"):
        for name in ("mean", "comoment", "minimum", "maximum", "norm_histogram"):
            found[f"stats {split} {name}"] = relative(
                getattr(there.moments(split), name), getattr(here.moments(split), name)
            )

    def records(reached: list[DictionaryRecord], expected: list[DictionaryRecord], what: str) -> None:
        for mine, theirs in zip(reached, expected, strict=True):
            assert mine.name == theirs.name
            for figure, value in theirs.heldout.items():
                if isinstance(value, float) and not figure.endswith("per_s"):
                    found[f"{what} {mine.name} {figure}"] = relative(mine.heldout[figure], value)

    for k in profile.clustering.ks:
        for name in ("centroids", "gain_shape_atoms", "inertia_curve"):
            found[f"k={k} {name}"] = relative(there.kmeans_model(k)[name], here.kmeans_model(k)[name])
        records(there.kmeans_records(k), here.kmeans_records(k), "kmeans")
        for name, replicas in here.kmeans_seed_records(k).items():
            records(there.kmeans_seed_records(k)[name], replicas, "seed")
        density = [json.loads(layout.density_file(k).read_text()) for layout in (here, there)]
        for figure in ("train_log_likelihood_curve", "heldout_mean_log_likelihood"):
            found[f"gmm k={k} {figure}"] = relative(density[1][figure], density[0][figure])
    records(there.leader_records(), here.leader_records(), "leader")
    records(there.itda_records(profile), here.itda_records(profile), "itda")
    records(there.sae_records(), here.sae_records(), "sae")
    return dict(sorted(found.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the run's config (shipped profile name or run file)")
    parser.add_argument("data_root", type=Path, help="where the run's sample, activations and SAEs are")
    parser.add_argument("out", type=Path, help="a scratch folder for the two copies")
    parser.add_argument("--json", type=Path, help="write the timings and every difference here")
    args = parser.parse_args()
    profile = load_run_config(args.config)
    timings, layouts = {}, {}
    for name, cluster in (("in_process", ""), ("local_cluster_2_workers", "local")):
        copy_inputs(args.data_root, args.out / name, profile.name)
        started = time.perf_counter()
        layouts[name] = materialise(profile, args.out / name, cluster)
        timings[f"{name}_s"] = time.perf_counter() - started
        print(f"{name}: {timings[f'{name}_s']:.0f} s", flush=True)
    found = differences(profile, layouts["in_process"], layouts["local_cluster_2_workers"])
    print(f"{len(found)} figures compared; the largest relative differences:")
    for name, value in list(found.items())[:12]:
        print(f"  {value:.3g}  {name}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"config": profile.name, **timings, "figures_compared": len(found)}
        args.json.write_text(json.dumps(summary | {"relative_differences": found}, indent=1))


if __name__ == "__main__":
    main()

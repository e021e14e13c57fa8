"""The store passes on a real Dask cluster (2 single-threaded worker processes on loopback):
the same figures as in this process, a worker killed mid-fit, a partition a worker cannot read."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import dagster as dg
import dask
import numpy as np
import pytest
import torch

from gemma_assets.core.bf16 import bf16_to_bits
from gemma_assets.core.config import ConfigError
from gemma_assets.core.engine import DaskEngine, InProcess, Partitioned, open_engine
from gemma_assets.core.kmeans import fit_kmeans
from gemma_assets.core.storage import ActivationStore, StorageError
from gemma_assets.defs.graph import build_definitions
from gemma_assets.defs.resources import DASK_CLUSTER_ENV_VAR, DASK_WORKERS_ENV_VAR, ComputeResource

# the workers cannot import this module (a test file): its functions travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FIT_RELATIVE = 1e-9  # k-means, gain-shape and GMM figures (issue #26)
STATS_RELATIVE = 1e-12
K = 64


def _relative(reached, expected) -> float:
    reached, expected = np.asarray(reached, float), np.asarray(expected, float)
    both_nan = np.isnan(reached) & np.isnan(expected)
    gap = np.where(both_nan, 0.0, np.abs(reached - expected) / np.maximum(np.abs(expected), 1e-300))
    return float(gap.max()) if gap.size else 0.0


@pytest.fixture(scope="module")
def two_worker_run(tiny_run, tmp_path_factory, monkeypatch_module):
    """The tiny run's statistics, clustering (k = 64: each step starts its own cluster, seconds
    apiece), density, leader, ITDA and SAE evaluation steps again on a 2-worker LocalCluster,
    from a copy of its sample, activations and trained SAEs."""
    name = tiny_run.profile.name
    data_root = tmp_path_factory.mktemp("distributed")
    for folder in ("sample", "activations"):
        shutil.copytree(tiny_run.data_root / name / folder, data_root / name / folder)
    evaluation = (tiny_run.layout.sae_evaluation_file, tiny_run.layout.sae_windows_file, tiny_run.layout.sae_seeds_file)
    shutil.copytree(
        tiny_run.data_root / name / "saes",
        data_root / name / "saes",
        ignore=lambda folder, names: [n for n in names if Path(folder, n) in evaluation],
    )
    shutil.copytree(tiny_run.data_root / "models", data_root / "models", symlinks=True)
    monkeypatch_module.setenv(DASK_CLUSTER_ENV_VAR, "local")
    monkeypatch_module.setenv(DASK_WORKERS_ENV_VAR, "2")
    defs = build_definitions(tiny_run.profile, data_root=str(data_root))
    assert defs.resources["compute"].cluster == "local"
    with dg.instance_for_test() as instance:
        analyse = defs.resolve_job_def("analyse")
        for selection in (
            ["activation_stats", "whitening"],
            ["leader_clusters", "itda_dictionaries", "sae_evaluation"],
        ):
            keys = [dg.AssetKey(asset) for asset in selection]
            assert analyse.execute_in_process(instance=instance, asset_selection=keys).success
        fits = defs.resolve_job_def("fit_cluster_models")
        keys = [dg.AssetKey("cluster_models"), dg.AssetKey("cluster_density")]
        assert fits.execute_in_process(instance=instance, partition_key=str(K), asset_selection=keys).success
    return defs.resources["storage"].layout()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_statistics_on_two_workers_equal_in_process(tiny_run, two_worker_run):
    for split in ("train", "heldout"):
        expected, reached = tiny_run.layout.moments(split), two_worker_run.moments(split)
        assert reached.count == expected.count
        for name in ("mean", "comoment", "minimum", "maximum", "norm_histogram"):
            assert _relative(getattr(reached, name), getattr(expected, name)) <= STATS_RELATIVE, (split, name)


def test_fits_on_two_workers_equal_in_process(tiny_run, two_worker_run):
    """k-means (with its seed refits), gain-shape, top-m and GMM figures to 1e-9 relative."""
    for k in (K,):
        expected, reached = tiny_run.layout.kmeans_model(k), two_worker_run.kmeans_model(k)
        for name in ("centroids", "gain_shape_atoms", "inertia_curve"):
            assert _relative(reached[name], expected[name]) <= FIT_RELATIVE, (k, name)
        for mine, theirs in zip(two_worker_run.kmeans_records(k), tiny_run.layout.kmeans_records(k), strict=True):
            for figure, value in theirs.heldout.items():
                if isinstance(value, float) and not figure.endswith("per_s"):
                    assert _relative(mine.heldout[figure], value) <= FIT_RELATIVE, (mine.name, figure)
        replicas = [layout.kmeans_seed_records(k) for layout in (two_worker_run, tiny_run.layout)]
        assert replicas[0].keys() == replicas[1].keys()
        for name, records in replicas[1].items():
            assert _relative([r.fvu for r in replicas[0][name]], [r.fvu for r in records]) <= FIT_RELATIVE, name
        seed_centroids = [layout.kmeans_seed_centroids(k) for layout in (two_worker_run, tiny_run.layout)]
        for mine, theirs in zip(*seed_centroids, strict=True):
            assert _relative(mine, theirs) <= FIT_RELATIVE
        density = [json.loads(layout.density_file(k).read_text()) for layout in (two_worker_run, tiny_run.layout)]
        for figure in ("train_log_likelihood_curve", "heldout_mean_log_likelihood"):
            assert _relative(density[0][figure], density[1][figure]) <= FIT_RELATIVE, (k, figure)
    leaders = [{r.name: r.fvu for r in layout.leader_records()} for layout in (two_worker_run, tiny_run.layout)]
    assert leaders[0].keys() == leaders[1].keys()
    assert _relative(list(leaders[0].values()), list(leaders[1].values())) <= FIT_RELATIVE


def test_evaluations_on_two_workers_equal_in_process(tiny_run, two_worker_run):
    """ITDA (fitted here, evaluated on the workers) and every SAE: held-out figures to 1e-9."""
    pairs = [
        (two_worker_run.itda_records(tiny_run.profile), tiny_run.layout.itda_records(tiny_run.profile)),
        (two_worker_run.sae_records(), tiny_run.layout.sae_records()),
    ]
    for mine, theirs in pairs:
        assert [r.name for r in mine] == [r.name for r in theirs]
        for reached, expected in zip(mine, theirs, strict=True):
            for figure, value in expected.heldout.items():
                if isinstance(value, float) and not figure.endswith("per_s"):
                    assert _relative(reached.heldout[figure], value) <= FIT_RELATIVE, (reached.name, figure)


def _store(root, partitions: int = 4, tokens: int = 3000, d: int = 16) -> ActivationStore:
    store = ActivationStore(str(root))
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(6, d, generator=generator) * 8
    for index in range(partitions):
        x = centres[torch.randint(6, (tokens,), generator=generator)] + torch.randn(tokens, d, generator=generator)
        positions = np.arange(tokens, dtype=np.int32) % 30
        arrays = {"activations": bf16_to_bits(x), "token_ids": np.full(tokens, 5, np.int32), "positions": positions}
        store.write_partition(f"{index:04d}", arrays, {"context_len": 30, "bos_token_id": 2})
    return store


def _slowly(x: torch.Tensor) -> torch.Tensor:
    """A transform that leaves the rows as they are and takes a while: tasks long enough to be killed."""
    time.sleep(0.3)
    return x


def test_worker_killed_mid_fit_gives_the_same_centroids(tmp_path):
    store = _store(tmp_path)
    keys = store.committed_keys()
    init = torch.randn(6, 16, generator=torch.Generator().manual_seed(3)) * 8
    here = fit_kmeans(Partitioned.of(InProcess(), store, keys), 6, max_iter=4, tol=0.0, init=init)
    with open_engine("local", workers=2) as engine:
        assert isinstance(engine, DaskEngine)
        data = Partitioned.of(engine, store, keys, _slowly)
        pids = engine.client.run(os.getpid)
        fitted: dict = {}
        fit = threading.Thread(target=lambda: fitted.update(result=fit_kmeans(data, 6, max_iter=4, tol=0.0, init=init)))
        fit.start()
        deadline = time.monotonic() + 60
        while not any(engine.client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.15)  # inside the first pass's tasks (0.3 s each)
        victim = next(iter(pids.values()))
        os.kill(victim, signal.SIGKILL)
        fit.join(timeout=240)
        assert not fit.is_alive(), "the fit did not finish after a worker was killed"
        assert victim not in engine.client.run(os.getpid).values()  # the nanny started a new one
    result = fitted["result"]
    assert torch.equal(result.centroids, here.centroids)
    assert result.inertia_curve == pytest.approx(here.inertia_curve, rel=FIT_RELATIVE)


def _linger_at_exit() -> bool:
    """A thread that is not a daemon: the worker's interpreter waits 8 s for it before it exits."""
    threading.Thread(target=time.sleep, args=(8,)).start()
    return True


def test_a_worker_killed_at_close_is_not_a_warning():
    """A worker slower to exit than the nanny's 4 s is killed when the cluster closes, as it
    should be; the nanny's warning of it is not shown (its INFO lines never are)."""
    logged: list[logging.LogRecord] = []
    keep = logging.Handler()
    keep.emit = logged.append  # type: ignore[method-assign]
    nanny = logging.getLogger("distributed.nanny")
    nanny.addHandler(keep)
    try:
        with open_engine("local", workers=2) as engine:
            assert isinstance(engine, DaskEngine)
            assert all(engine.client.run(_linger_at_exit).values())
    finally:
        nanny.removeHandler(keep)
    messages = [record.getMessage() for record in logged]
    assert sum("was killed by signal 9" in m for m in messages) == 2, messages  # the kills happened
    assert not [record for record in logged if record.levelno >= logging.WARNING], messages
    assert not nanny.filters  # the filter goes with the cluster


def test_a_partition_a_worker_cannot_read_is_the_same_storage_error(tmp_path):
    store = _store(tmp_path, partitions=2, tokens=600)
    key = store.committed_keys()[1]
    version = tmp_path / "activations" / f"part-{key}" / store.manifest(key)["version"]
    chunk = next(path for path in sorted((version / "activations").rglob("*")) if path.is_file())
    chunk.unlink()
    init = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    messages = []
    for engine_of in (lambda: open_engine(""), lambda: open_engine("local", workers=2)):
        with engine_of() as engine, pytest.raises(StorageError) as raised:
            fit_kmeans(Partitioned.of(engine, store, store.committed_keys()), 3, max_iter=1, init=init)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    assert f"activation partition {key}" in messages[1] and "rematerialise" in messages[1]


def test_compute_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv(DASK_CLUSTER_ENV_VAR, "tcp://127.0.0.1:8786")
    monkeypatch.setenv(DASK_WORKERS_ENV_VAR, "3")
    compute = ComputeResource.from_environment()
    assert (compute.cluster, compute.workers, compute.threads_per_worker) == ("tcp://127.0.0.1:8786", 3, 1)
    monkeypatch.setenv(DASK_WORKERS_ENV_VAR, "two")
    with pytest.raises(ConfigError, match=f"{DASK_WORKERS_ENV_VAR} is 'two'"):
        ComputeResource.from_environment()


def _worker_environment(*names: str) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in names}


def test_a_local_cluster_leaves_this_process_environment_as_it_found_it(monkeypatch):
    """The workers get Dask's pre-spawn environment; this process, once the cluster has closed,
    has its own back (its later subprocesses would otherwise run with one BLAS thread)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)  # one the engine adds to Dask's
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the user's own setting, which Dask passes on
    with open_engine("local", workers=1) as engine:
        assert isinstance(engine, DaskEngine)
        (seen,) = engine.client.run(_worker_environment, "OMP_NUM_THREADS", "MKL_NUM_THREADS").values()
    assert seen == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "3"}
    leaked = {"OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"} & set(os.environ)
    assert not leaked
    assert os.environ["MKL_NUM_THREADS"] == "3"


def _malloc_settings_and_housekeeping(dask_worker) -> dict[str, object]:
    return {
        **_worker_environment("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"),
        "profiling": "profile" in dask_worker.periodic_callbacks,
        "every ms": _housekeeping_intervals(dask_worker, ("tick", "monitor", "memory_monitor")),
    }


def _housekeeping_intervals(server, names: tuple[str, ...]) -> dict[str, float]:
    return {name: server.periodic_callbacks[name].callback_time for name in names}


def test_local_cluster_workers_keep_small_buffers_on_the_heap_and_run_less_housekeeping(monkeypatch):
    """A LocalCluster's workers get heap-friendly malloc thresholds in place of Dask's (whose
    65536-byte trim threshold maps every decoded chunk afresh), where this process's environment
    does not set its own; no profiler for a dashboard that is not served; and Dask's periodic
    checks at intervals that leave the tasks their CPU, on the scheduler too."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")  # the user's own, which wins
    with open_engine("local", workers=1) as engine:
        assert isinstance(engine, DaskEngine)
        (seen,) = engine.client.run(_malloc_settings_and_housekeeping).values()
        scheduler = engine.client.run_on_scheduler(
            lambda dask_scheduler: _housekeeping_intervals(dask_scheduler, ("tick", "stealing"))
        )
    assert seen == {
        "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20),
        "MALLOC_MMAP_THRESHOLD_": "1048576",
        "profiling": False,
        "every ms": {"tick": 1000, "monitor": 5000, "memory_monitor": 500},
    }
    assert scheduler == {"tick": 1000, "stealing": 500}
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ and os.environ["MALLOC_MMAP_THRESHOLD_"] == "1048576"


def _user_preload_ran(dask_worker) -> bool:
    return getattr(dask_worker, "user_preload_ran", False)


def test_a_preload_of_dasks_config_still_runs_on_local_workers(tmp_path, monkeypatch):
    """The engine's own preload goes beside the user's, given in Dask's config as one string."""
    (tmp_path / "user_preload.py").write_text("def dask_setup(worker):\n    worker.user_preload_ran = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # a spawned worker starts with this sys.path
    with dask.config.set({"distributed.worker.preload": "user_preload"}), open_engine("local", workers=1) as engine:
        assert isinstance(engine, DaskEngine)
        (ran,) = engine.client.run(_user_preload_ran).values()
    assert ran


def _log_failed_heartbeats() -> None:
    """As Dask's worker logs a failed heartbeat: once on a comm the scheduler closed, once timed out."""
    from distributed.comm import CommClosedError

    for error in (CommClosedError("in <TCP (closed)>: Stream is closed"), OSError("Timed out, the kept one")):
        try:
            raise error
        except OSError:
            logging.getLogger("distributed.worker").exception("Failed to communicate with scheduler during heartbeat.")


def test_local_cluster_workers_do_not_log_a_heartbeat_cut_by_the_close(capfd):
    """The traceback a LocalCluster's close can leave in a worker's log (its heartbeat's comm
    closed by the scheduler, dask/distributed#7105) is dropped; a heartbeat that timed out is not."""
    with open_engine("local", workers=1) as engine:
        assert isinstance(engine, DaskEngine)
        engine.client.run(_log_failed_heartbeats)
    errors = capfd.readouterr().err
    assert "Timed out, the kept one" in errors
    assert "Stream is closed" not in errors


def test_a_scheduler_that_does_not_answer_is_a_clear_error():
    with pytest.raises(ConfigError, match="no Dask scheduler answers at compute cluster 'tcp://127.0.0.1:9'"):
        with open_engine("tcp://127.0.0.1:9", connect_timeout_s=1):
            pass


def test_the_default_engine_is_this_process():
    assert ComputeResource().cluster == ""
    with open_engine("") as engine:
        assert isinstance(engine, InProcess)


def test_cuml_on_a_cluster_without_cuml_names_the_extra(tmp_path):
    if importlib.util.find_spec("cuml") is not None:
        pytest.skip("cuML is installed: this checks the message where it is not")
    store = _store(tmp_path, partitions=2, tokens=600)
    init = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    with open_engine("local", workers=1) as engine, pytest.raises(ConfigError, match=r"pip install '\.\[gpu\]'"):
        fit_kmeans(Partitioned.of(engine, store, store.committed_keys()), 3, backend="cuml", init=init)

"""Where the passes over the activation store run: in this process, or on a Dask cluster.

A pass over the store is a map over its committed partitions, then a reduce. A task opens
partitions, streams them batch by batch and returns what the pass needs of them: float64 sums
and counts, a partition's labels or statistics, a bounded sample. The driver folds the results
in partition order, whatever order they finished in, so a figure does not depend on which
worker ran which task, and on the number of workers only through the float64 rounding of the
sums' grouping. Workers read their partitions straight from the store (local or s3://);
activations never cross the network.

- `InProcess` runs the tasks here, one partition after another: one partition's memory at a
  time, as a streamed pass always had.
- `DaskEngine` keeps up to two tasks per worker in flight on a `distributed` cluster and
  yields the results in order as they arrive. A pass's shared inputs (centroids, a
  dictionary) go to every worker once. `map_reduce` gives each worker one contiguous run of
  partitions and adds its results there, so what crosses the network per pass is one result
  per worker (k x d sums for Lloyd), not one per partition. Tasks are pure functions of their partitions and those inputs: when a
  worker dies, the scheduler runs its tasks again on another and the pass ends the same.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import torch

from gemma_assets.core.config import ConfigError
from gemma_assets.core.storage import ActivationStore

if TYPE_CHECKING:
    from distributed import Client

T = TypeVar("T")
R = TypeVar("R")

LOCAL = "local"  # the compute resource's `cluster` for a LocalCluster on this machine


HELD_BATCH_ROWS = 65536  # rows per batch of a partition held in memory (batches.as_batches' default)


@dataclass(frozen=True)
class Shard:
    """One committed partition as a task reads it: the store's URL (not an open store, so it
    pickles small), the partition key and the transforms applied to each batch, in order. A
    shard `held` in memory keeps its rows, read and transformed once, for passes in this process."""

    store_url: str
    key: str
    transforms: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()
    held: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def _transformed(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x)
        return x

    def batches(self) -> Iterator[torch.Tensor]:
        """The partition's non-BOS activations, transformed, batch by batch."""
        if self.held is not None:
            for start in range(0, len(self.held), HELD_BATCH_ROWS):
                yield self._transformed(self.held[start : start + HELD_BATCH_ROWS])
            return
        for x, _ in ActivationStore(self.store_url).iter_tokens([self.key]):
            yield self._transformed(x)

    def window_batches(self) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """`batches`, each with the window id of its tokens (see storage.window_ids); from the store."""
        if self.held is not None:
            raise ValueError(f"partition {self.key} is held in memory without its window ids: read it from the store")
        for x, windows in ActivationStore(self.store_url).window_batches([self.key])():
            yield self._transformed(x), windows

    def in_memory(self) -> Shard:
        """This partition read once, transformed, into memory."""
        batches = list(self.batches())
        rows = torch.cat(batches) if batches else torch.empty(0)
        return Shard(self.store_url, self.key, (), rows)


class Engine(Protocol):
    """Runs one task per item and yields the results in the items' order."""

    @property
    def workers(self) -> int: ...

    def imap(self, task: Callable[..., R], items: Sequence[T], *shared: Any) -> Iterator[R]:
        """task(item, *shared) for each item, in order; `shared` is sent to each worker once."""
        ...


class InProcess:
    """Every task in this process, lazily: the next runs when the previous result is consumed."""

    workers = 1

    def imap(self, task: Callable[..., R], items: Sequence[T], *shared: Any) -> Iterator[R]:
        return (task(item, *shared) for item in items)


def _run_task(task: Callable[..., R], item: Any, shared: tuple, threads: int) -> R:
    """A task on a worker, with torch's intra-op threads matched to the worker's (the nanny sets
    OMP_NUM_THREADS=1; a worker of n threads should use n)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return task(item, *shared)


@dataclass
class Traffic:
    """Bytes of pickled payload that crossed the network (counted when a DaskEngine is asked to:
    it pickles each payload once more to weigh it)."""

    sent: int = 0  # shared inputs (once per worker) and task arguments
    received: int = 0  # task results


def _pickled_bytes(payload: object) -> int:
    import cloudpickle

    return len(cloudpickle.dumps(payload, protocol=5))


@dataclass
class DaskEngine:
    """Tasks on a `distributed` cluster (see the module's docstring)."""

    client: Client
    threads_per_worker: int = 1
    traffic: Traffic | None = None  # a Traffic to count payload bytes in (benchmarks/dask_cluster.py)

    @property
    def workers(self) -> int:
        return max(1, len(self.client.scheduler_info(n_workers=-1)["workers"]))

    def imap(self, task: Callable[..., R], items: Sequence[T], *shared: Any) -> Iterator[R]:
        """Up to two tasks per worker in flight: results wait on the workers for the driver to
        take them in order, and a bounded window keeps that wait (and their memory) bounded."""
        # one future holding every shared input, on every worker (hash=False: a fresh key per pass)
        shared_future = self.client.scatter([shared], broadcast=True, hash=False)[0]
        if self.traffic is not None:
            self.traffic.sent += _pickled_bytes(shared) * self.workers
        waiting = iter(items)
        in_flight: collections.deque = collections.deque()

        def submit(count: int) -> None:
            for item in itertools.islice(waiting, count):
                if self.traffic is not None:
                    self.traffic.sent += _pickled_bytes(item)
                in_flight.append(
                    self.client.submit(_run_task, task, item, shared_future, self.threads_per_worker, pure=False)
                )

        submit(2 * self.workers)
        try:
            while in_flight:
                future = in_flight.popleft()
                result = future.result()  # a task's exception (a StorageError, say) is raised here as itself
                if self.traffic is not None:
                    self.traffic.received += _pickled_bytes(result)
                future.release()
                submit(1)
                yield result
        finally:
            self.client.cancel(list(in_flight))
            shared_future.release()


@dataclass(frozen=True)
class Partitioned:
    """Store partitions and the engine that runs passes over them. Called, it is a `Batches`
    stream read in this process (for the loops that keep state across passes in memory); the
    passes written as map-reduce hand `shards` to `engine.imap` instead."""

    engine: Engine
    shards: tuple[Shard, ...]

    @classmethod
    def of(
        cls,
        engine: Engine,
        store: ActivationStore,
        keys: Sequence[str],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Partitioned:
        transforms = () if transform is None else (transform,)
        return cls(engine, tuple(Shard(store.root, key, transforms) for key in keys))

    @property
    def distributed(self) -> bool:
        return not isinstance(self.engine, InProcess)

    def __call__(self) -> Iterator[torch.Tensor]:
        return itertools.chain.from_iterable(shard.batches() for shard in self.shards)

    def mapped(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> Partitioned:
        """The same partitions with `transform` applied after the existing transforms."""
        return replace(self, shards=tuple(replace(s, transforms=(*s.transforms, transform)) for s in self.shards))

    def window_batches(self) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        return itertools.chain.from_iterable(shard.window_batches() for shard in self.shards)

    def in_memory(self) -> Partitioned:
        """The partitions read once into this process's memory: later passes read memory, not the
        store (for data that fits, fitted in this process)."""
        return replace(self, shards=tuple(shard.in_memory() for shard in self.shards))


def map_reduce(
    data: Partitioned,
    task: Callable[..., R],
    add: Callable[[R, R], R],
    *shared: Any,
    on_result: Callable[[R], None] = lambda _: None,
) -> R:
    """task(shard, *shared) of every partition, added up with `add` in partition order. On a
    cluster the partitions are cut into one contiguous run per worker, and a task adds up its
    run's results there: one result per worker crosses the network, however many partitions
    there are. `on_result` sees each run's total as it arrives (progress)."""
    if not data.shards:
        raise ValueError("no store partitions to reduce over")
    runs = (
        [(shard,) for shard in data.shards] if not data.distributed else _contiguous(data.shards, data.engine.workers)
    )
    total: R | None = None
    for result in data.engine.imap(_reduce_run, runs, task, add, *shared):
        on_result(result)
        total = result if total is None else add(total, result)
    assert total is not None
    return total


def _contiguous(shards: tuple[Shard, ...], runs: int) -> list[tuple[Shard, ...]]:
    """`shards` in order, cut into `runs` runs whose lengths differ by at most one."""
    runs = min(runs, len(shards))
    bounds = [round(i * len(shards) / runs) for i in range(runs + 1)]
    return [shards[start:stop] for start, stop in itertools.pairwise(bounds)]


def _reduce_run(run: tuple[Shard, ...], task: Callable[..., R], add: Callable[[R, R], R], *shared: Any) -> R:
    total = task(run[0], *shared)
    for shard in run[1:]:
        total = add(total, task(shard, *shared))
    return total


def _weigh_tensors() -> None:
    """Tell Dask a torch tensor's size (it would count a few dozen bytes), so its memory manager
    sees the sums and samples that results hold."""
    from dask.sizeof import sizeof

    sizeof.register(torch.Tensor)(lambda tensor: tensor.element_size() * tensor.nelement())


def local_cluster_size(workers: int) -> int:
    """A LocalCluster's worker processes: `workers`, or one per core when 0."""
    return workers or os.cpu_count() or 1


@contextmanager
def open_engine(
    cluster: str = "", workers: int = 0, threads_per_worker: int = 1, connect_timeout_s: float = 20
) -> Iterator[Engine]:
    """The engine a step's passes run on, for the compute resource's `cluster`:
    "" in this process; "local" a LocalCluster of `workers` worker processes (0: one per core;
    on a CUDA machine with dask-cuda, one per GPU); otherwise a scheduler's address, which must
    answer within `connect_timeout_s`."""
    if not cluster:
        yield InProcess()
        return
    if threads_per_worker < 1:
        raise ConfigError(f"compute threads_per_worker must be at least 1, got {threads_per_worker}")
    try:
        from distributed import Client, LocalCluster
    except ImportError as error:
        raise ConfigError(
            f"compute cluster {cluster!r} needs Dask, which is not installed -> pip install 'gemma_assets[cluster]'"
        ) from error
    _weigh_tensors()
    if cluster == LOCAL:
        # results straight from the workers, not relayed by the scheduler: its relay ran in this
        # process: 3.8 s of its CPU vs 2.7 s for 8 statistics results of 61 MB (2 workers; measured
        # before a result carried half its co-moment)
        with (
            _local_cluster(LocalCluster, workers, threads_per_worker) as local,
            Client(local, direct_to_workers=True) as client,
        ):
            yield DaskEngine(client, threads_per_worker)
        return
    try:
        client = Client(cluster, timeout=f"{connect_timeout_s}s")
    except (OSError, TimeoutError, ValueError) as error:
        raise ConfigError(
            f"no Dask scheduler answers at compute cluster {cluster!r} ({error}) -> start one there, "
            f"or set the compute resource's cluster to 'local' (a cluster on this machine) or '' (in this process)"
        ) from error
    with client:
        yield DaskEngine(client, threads_per_worker)


class _ExpectedKills(logging.Filter):
    """A nanny closing with its cluster kills a worker process that has not exited within 4 s (a
    torch process's teardown on a busy two-core machine can take longer) and warns "Worker process
    still alive after 4.0 seconds, killing": expected at a close, so not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Worker process still alive after")


@contextmanager
def _local_cluster(local_cluster: type, workers: int, threads_per_worker: int) -> Iterator[Any]:
    """One worker per GPU through dask-cuda where CUDA and dask-cuda are there; otherwise
    `workers` CPU worker processes. No dashboard (bokeh is not a dependency) and no log chatter."""
    import dask

    cluster_type: type = local_cluster
    options: dict[str, Any] = {"n_workers": local_cluster_size(workers), "processes": True}
    if torch.cuda.is_available():
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            pass
        else:
            cluster_type, options = LocalCUDACluster, {}
    nanny, expected = logging.getLogger("distributed.nanny"), _ExpectedKills()
    nanny.addFilter(expected)
    try:
        with (
            dask.config.set(_local_cluster_settings()),
            _environment_kept(),  # after the settings: it restores the variables they name
            cluster_type(
                threads_per_worker=threads_per_worker,
                silence_logs=logging.WARNING,
                dashboard_address=None,
                # an argument, not Dask's config: dask-cuda passes its own preload, and a nanny
                # given one reads no preload from the config
                preload=[*_configured_preloads(), WORKER_LOGGING_PRELOAD],
                **options,
            ) as cluster,
        ):
            yield cluster
    finally:
        nanny.removeFilter(expected)


# glibc malloc for a LocalCluster's workers. Dask's MALLOC_TRIM_THRESHOLD_=65536 also turns off
# glibc's dynamic mmap threshold, so each 2 MiB chunk buffer zarr decodes into is a fresh mapping,
# faulted in page by page: 800k page faults per statistics pass of 8 partitions on one worker.
# Buffers under 32 MiB from the heap, and 64 MiB of it kept: 62k faults, half the system CPU,
# and each worker's peak RSS ~110 MB higher (benchmarks/dask_cluster.py's Lloyd: 578 -> 690 MB).
WORKER_MALLOC_ENVIRONMENT = {"MALLOC_TRIM_THRESHOLD_": 64 * 2**20, "MALLOC_MMAP_THRESHOLD_": 32 * 2**20}
# run in each worker as it starts (Dask's preload protocol): keeps a spurious error out of its log
WORKER_LOGGING_PRELOAD = "gemma_assets.core.worker_logging"


def _local_cluster_settings() -> dict[str, Any]:
    """Dask settings for a LocalCluster (its workers, nannies and scheduler):

    - the malloc thresholds above in the workers' pre-spawn environment (a variable set in this
      process's environment still wins, as Dask's nanny gives it precedence);
    - no statistical profiler: it samples every thread's stack each 10 ms on the worker's event
      loop (0.4 s of a 20 s statistics pass) for a dashboard a LocalCluster here does not serve;
    - Dask's periodic housekeeping less often (the event-loop health tick every 1 s, not 20 ms;
      the dashboard's system samples every 5 s, not 500 ms; the memory monitor and work stealing
      every 500 ms, not 100 ms). At Dask's intervals (the profiler off) an idle 2-worker cluster
      kept 8% of a core busy, CPU the workers' tasks want on a small machine; now 1.5%. A
      blocked event loop is still reported past 3 s."""
    import dask

    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_MALLOC_ENVIRONMENT}
    return {
        "distributed.nanny.pre-spawn-environ": environ,
        "distributed.worker.profile.enabled": False,
        "distributed.admin.tick.interval": "1s",
        "distributed.admin.system-monitor.interval": "5s",
        "distributed.worker.memory.monitor-interval": "500ms",
        "distributed.scheduler.work-stealing-interval": "500ms",
    }


def _configured_preloads() -> list[str]:
    """The worker preloads of Dask's config, which may be one module as a string or a list."""
    import dask

    configured = dask.config.get("distributed.worker.preload")
    return [configured] if isinstance(configured, str) else list(configured)


@contextmanager
def _environment_kept() -> Iterator[None]:
    """A nanny passes its worker the pre-spawn environment (OMP_NUM_THREADS=1, the malloc
    thresholds, ...) by writing it into this process's os.environ, and leaves it there. Those
    variables are put back as they were once the cluster has closed: otherwise the processes this
    one starts afterwards (the tests' commands, for one) would run with one BLAS thread and the
    workers' malloc settings."""
    import dask

    names = {*dask.config.get("distributed.nanny.pre-spawn-environ"), "PYTHONHASHSEED"}
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

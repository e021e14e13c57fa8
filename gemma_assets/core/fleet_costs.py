"""The cost of a run spread over machines (`gemma-assets preflight --workers M --gpus N`):
extraction divided over N GPUs, each pass over the activation store divided over M Dask workers
that read their partitions themselves and send back sufficient statistics, and what crosses the
network per Lloyd iteration. Counted from the run config, d_model and per-device rates; nothing
is run. Upper bounds where the fits stop early: every Lloyd and EM iteration is counted."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from gemma_assets.core import costs
from gemma_assets.core.config import ConfigError, RunConfig

# benchmarks/results/gpu_h100.json, extraction.partition: a partition of 2,048 windows of 128
# tokens through gemma-2-2b's first 13 blocks and copied to the host, on one H100
H100_EXTRACTION_TOKENS_PER_S = 89_100.0
# benchmarks/results/stats_cpu_d2304.json: d-2304 partitions read and decoded at 0.347 GB/s of
# bf16 on two threads; chunks decode in parallel, so one worker thread is taken as half of it
STORE_READ_BYTES_PER_S_PER_THREAD = 0.347e9 / 2
BFLOAT16_BYTES, FLOAT32_BYTES, FLOAT64_BYTES = 2, 4, 8
MAX_PARTITIONS = 9999  # sampling.partitions' bound: partition keys have four digits


@dataclass(frozen=True)
class FleetRates:
    """What one device does per second: a GPU's extraction, a worker's store read and its
    float32 GEMM (one thread on a CPU core, or a whole GPU for a dask-cuda worker)."""

    worker_flops: float
    gpu_tokens_per_s: float = H100_EXTRACTION_TOKENS_PER_S
    worker_read_bytes_per_s: float = STORE_READ_BYTES_PER_S_PER_THREAD


@dataclass(frozen=True)
class StageCost:
    """One stage of the run on the fleet: its total work and the wall clock it takes there."""

    stage: str
    store_passes: float  # reads of the split the stage streams (extraction writes the store once)
    read_bytes: float  # in all, over every worker
    flops: float  # in all, over every worker
    seconds: float
    assumption: str


@dataclass(frozen=True)
class FleetPlan:
    gpus: int
    workers: int
    tokens: int
    d_model: int
    store_bytes: float  # the activation store, bf16, uncompressed
    stages: tuple[StageCost, ...]
    lloyd_k: int  # the k the network figures are at (the largest)
    lloyd_bytes_to_each_worker: float  # per Lloyd iteration: the centroids, float32
    lloyd_bytes_from_each_worker: float  # per Lloyd iteration: float64 sums and counts
    worker_memory_bytes: float

    @property
    def seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)

    @property
    def lloyd_bytes_at_client(self) -> float:
        """What the client receives per Lloyd iteration: every worker's sums."""
        return self.workers * self.lloyd_bytes_from_each_worker

    def to_json(self) -> dict:
        return asdict(self) | {"seconds": self.seconds, "lloyd_bytes_at_client": self.lloyd_bytes_at_client}


def at_tokens(run: RunConfig, tokens: int) -> RunConfig:
    """`run` sampled to about `tokens` tokens: as many partitions of the same size as that takes,
    the held-out partitions keeping their share of them."""
    sample = run.sampling
    partitions = math.ceil(tokens / sample.tokens_per_partition)
    if partitions > MAX_PARTITIONS:
        raise ConfigError(
            f"--tokens {tokens:,} needs {partitions:,} partitions of {sample.tokens_per_partition:,} tokens, more "
            f"than {MAX_PARTITIONS:,} -> raise sampling.windows_per_partition with --set"
        )
    holdout = max(1, round(partitions * sample.holdout_partitions / sample.partitions))
    data = run.model_dump(mode="json")
    data["sampling"] |= {"partitions": max(partitions, holdout + 1), "holdout_partitions": holdout}
    return RunConfig.model_validate(data)


def fleet_plan(run: RunConfig, d_model: int, gpus: int, workers: int, rates: FleetRates) -> FleetPlan:
    """Per-stage wall clock of `run` with extraction over `gpus` GPUs and the store passes over
    `workers` Dask workers. A pass over a split costs its bf16 bytes over the workers' read rate
    plus its FLOPs over their GEMM rate (a single-threaded worker reads and computes in turn);
    partitions are taken to spread evenly, the scheduler and the reduction to cost nothing."""
    if gpus < 1 or workers < 1:
        raise ConfigError(f"--gpus {gpus} --workers {workers}: each needs at least 1")
    sample, spec, d = run.sampling, run.clustering, d_model
    tokens = sample.n_windows * sample.context_len
    train = run.train_tokens
    heldout = sample.holdout_partitions * sample.windows_per_partition * (sample.context_len - 1)
    token_bytes = d * BFLOAT16_BYTES
    fits_per_k = 2 * run.seeds  # k-means and spherical k-means (gain-shape)
    work = {w.asset: w for w in costs.stage_work(run, d, None)}  # seeding and EM FLOPs

    def over_workers(stage: str, passes: float, rows: int, flops: float, assumption: str) -> StageCost:
        read = passes * rows * token_bytes
        seconds = read / (workers * rates.worker_read_bytes_per_s) + flops / (workers * rates.worker_flops)
        return StageCost(stage, passes, read, flops, seconds, assumption)

    lloyd_passes = fits_per_k * len(spec.ks) * spec.max_iter
    em_passes = len(spec.ks) * (run.density.max_iter + 2)
    widths = [*(k for k in spec.ks for _ in range(fits_per_k)), *(costs.sae_width(s) for s in run.sae_specs)]
    seeding_fits = fits_per_k * len(spec.ks)
    stages = (
        StageCost(
            "extraction",
            0,
            0.0,
            0.0,
            tokens / (gpus * rates.gpu_tokens_per_s),
            f"{tokens:,} tokens over {gpus} GPU(s); compression and writes overlap the forward passes",
        ),
        over_workers(
            "statistics",
            1,
            tokens,
            tokens * d * d * 2,
            "one pass over every token: its d x d co-moment",
        ),
        StageCost(
            "k-means seeding",
            seeding_fits,
            seeding_fits * train * token_bytes,
            work["cluster_models"].skinny_flops,
            seeding_fits * train * token_bytes / (workers * rates.worker_read_bytes_per_s)
            + work["cluster_models"].skinny_flops / rates.worker_flops,
            f"per fit, a pass drawing the {spec.seeding} sample; the seeding itself in one process (the client) "
            "at a worker's rate",
        ),
        over_workers(
            "k-means Lloyd",
            lloyd_passes,
            train,
            fits_per_k * spec.max_iter * train * sum(spec.ks) * d * 2,
            f"{fits_per_k} fit(s) per k x {spec.max_iter} iterations (clustering.max_iter, every one run), "
            "each a pass over the train split",
        ),
        over_workers(
            "assignments",
            len(spec.ks),
            tokens,
            tokens * sum(spec.ks) * d * 2,
            "the cluster of every token at each k: a pass per k",
        ),
        over_workers(
            "GMM EM",
            em_passes,
            train,
            work["cluster_density"].gemm_flops + em_passes * train * d * run.density.components * 2,
            f"{run.density.max_iter} + 2 passes per k (density.max_iter, every one run), each projecting to "
            f"{run.density.components} dimensions",
        ),
        over_workers(
            "held-out evaluation",
            1,
            heldout,
            heldout * sum(widths) * d * 2 * 2,
            f"per-window sums of {len(widths)} dictionaries, encoded and reconstructed in one pass over the held-out split",
        ),
    )
    largest = max(spec.ks)
    partition_bytes = sample.tokens_per_partition * d * (BFLOAT16_BYTES + FLOAT32_BYTES)
    return FleetPlan(
        gpus=gpus,
        workers=workers,
        tokens=tokens,
        d_model=d,
        store_bytes=tokens * token_bytes,
        stages=stages,
        lloyd_k=largest,
        lloyd_bytes_to_each_worker=largest * d * FLOAT32_BYTES,
        lloyd_bytes_from_each_worker=largest * (d + 1) * FLOAT64_BYTES,
        worker_memory_bytes=partition_bytes + largest * d * (FLOAT32_BYTES + FLOAT64_BYTES) + d * d * FLOAT64_BYTES,
    )


def one_thread_gemm_flops() -> float:
    """This machine's float32 GEMM rate on one thread: a single-threaded CPU worker's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return costs.MachineRates.measure().gemm
    finally:
        torch.set_num_threads(threads)

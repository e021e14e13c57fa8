"""activations: block-L residual stream of every sampled token, one zarr partition per work unit."""

import time

import dagster as dg
import numpy as np

from gemma_assets.core import model, sampling
from gemma_assets.core.config import RunConfig
from gemma_assets.core.extraction import extract_windows
from gemma_assets.defs.common import code_version, model_source
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource

GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}}


def partition_arrays(window_sample: sampling.TokenSample, acts_bits: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token arrays stored beside the activations, row-aligned with them."""
    n_windows, context_len = window_sample.tokens.shape
    return {
        "activations": acts_bits,
        "token_ids": window_sample.tokens.reshape(-1),
        "positions": np.tile(np.arange(context_len, dtype=np.int32), n_windows),
        "doc_ids": np.repeat(window_sample.doc_ids, context_len),
        "doc_offsets": (window_sample.starts[:, None] + np.arange(-1, context_len - 1)).reshape(-1),
        "strata": np.repeat(window_sample.strata, context_len),
    }


def build_activations_asset(
    run_config: RunConfig,
    partitions_def: dg.PartitionsDefinition,
    pile_sample: dg.AssetsDefinition,
    compute_dtype: str,
) -> dg.AssetsDefinition:
    """`compute_dtype` is what `model.dtype` resolves to here (auto: bfloat16 with a GPU, float32
    without): part of the version, so a store extracted on the CPU is stale on a GPU machine."""

    @dg.asset(
        partitions_def=partitions_def,
        backfill_policy=dg.BackfillPolicy.single_run(),  # one model load for many partitions
        pool="gpu",
        op_tags=GPU_TAGS,
        deps=[pile_sample],
        code_version=code_version("1", run_config, ("model",), [pile_sample], depends_on=compute_dtype),
        group_name="data",
        kinds={"zarr", "pytorch"},
    )
    def activations(
        context: dg.AssetExecutionContext,
        run: RunResource,
        storage: StorageResource,
        compute: ComputeResource,
    ) -> dg.MaterializeResult:
        """Residual stream after block L (= hidden_states[L+1]) as exact bf16, with token ids,
        positions, document ids and strata; each partition committed atomically."""
        prof = run.config
        source = model_source(prof, storage)
        sample = sampling.load_sample(storage.path("sample", "windows.npz"))
        tokenizer = model.load_tokenizer(source)
        lm = model.load_model(source, prof.model.layer, compute.resolved_device, compute.torch_dtype(prof.model.dtype))
        store = storage.activation_store()
        attrs = {
            "model": prof.model.name,
            "layer": prof.model.layer,
            "hook_name": prof.model.hook_name,
            "context_len": prof.sampling.context_len,
            "bos_token_id": tokenizer.bos_token_id,
            "vocab_size": len(tokenizer),
            "stratum_names": list(sample.stratum_names),
            "compute_dtype": str(compute.torch_dtype(prof.model.dtype)),
        }
        started = time.perf_counter()
        keys = context.partition_keys
        for done, key in enumerate(keys):
            part = sample.partition(prof.partition_keys.index(key), prof.sampling.windows_per_partition)

            def progress(tokens: int, rate: float, key: str = key) -> None:
                context.log.debug(f"partition {key}: {tokens} tokens, {rate:,.0f} tokens/s")

            bits = extract_windows(
                lm, part.tokens, prof.model.layer, compute.batch_size, compute.resolved_device, progress
            )
            manifest = store.write_partition(key, partition_arrays(part, bits), attrs)
            rate = (done + 1) * prof.sampling.tokens_per_partition / (time.perf_counter() - started)
            context.log.info(
                f"committed partition {key} ({done + 1}/{len(keys)}): {manifest['n_tokens']} tokens, "
                f"{rate:,.0f} tokens/s overall"
            )
        return dg.MaterializeResult(
            metadata={
                "partitions": len(keys),
                "tokens": len(keys) * prof.sampling.tokens_per_partition,
                "d_model": lm.config.hidden_size,
                "layer": prof.model.layer,
                "tokens_per_s": len(keys) * prof.sampling.tokens_per_partition / (time.perf_counter() - started),
                "device": compute.resolved_device,
                "store": dg.MetadataValue.path(store.root),
            }
        )

    return activations

"""sae_dictionary and sae_evaluation: the SAE side of the comparison, through SAELens."""

import json
import time

import dagster as dg
import polars as pl
import torch

from gemma_assets.core import metrics, sae
from gemma_assets.core.config import RunConfig
from gemma_assets.core.files import atomic_dir, write_json
from gemma_assets.core.memory import PeakRss
from gemma_assets.core.stats import ActivationMoments
from gemma_assets.defs.common import FOLLOW_UPSTREAM, code_version, table_md
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource


def build_sae_assets(run_config: RunConfig, activation_stats: dg.AssetsDefinition) -> list:
    @dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[activation_stats],
        code_version=code_version("2", run_config, ("saes",), [activation_stats]),
        group_name="sae",
        kinds={"pytorch"},
    )
    def sae_dictionary(
        context: dg.AssetExecutionContext,
        run: RunResource,
        storage: StorageResource,
        compute: ComputeResource,
    ) -> dg.MaterializeResult:
        """The profile's SAEs: TopK SAEs trained with SAELens' SAETrainer on the stored train
        split (tiny/demo), or pretrained Gemma Scope SAEs loaded with SAE.from_pretrained."""
        prof = run.config
        store = storage.activation_store()
        moments = ActivationMoments.load(storage.path("stats", "train_moments.npz"))
        scale = sae.activation_scale(moments.norm_sum / moments.count, moments.d_model)
        rows = []
        for spec in prof.sae_specs:
            out = storage.path("saes", spec.name)
            if spec.architecture == "pretrained":
                started = time.perf_counter()
                dictionary, facts = sae.load_pretrained(spec, compute.resolved_device), {}
                facts["load_seconds"] = time.perf_counter() - started
            else:
                with PeakRss() as peak:
                    dictionary, facts = sae.train_topk(
                        spec,
                        lambda: (x for x, _ in store.iter_tokens(prof.train_partition_keys)),
                        d_in=moments.d_model,
                        n_tokens=moments.count,
                        scale=scale,
                        epochs=prof.saes.train_epochs,
                        mean=torch.from_numpy(moments.mean).float(),
                        batch_size=prof.saes.batch_size,
                        device=compute.resolved_device,
                    )
                facts["fit_peak_rss_mb"] = peak.mb
                facts["train_partitions"] = prof.train_partition_keys
            record = {
                "name": spec.name,
                "architecture": spec.architecture,
                "width": spec.width or dictionary.sae.cfg.d_sae,
                "k": spec.k,
                "scale": dictionary.scale,
                "parameters": dictionary.n_parameters,
                **facts,
            }
            with atomic_dir(out) as staging:  # weights and their training record together
                dictionary.save(staging)
                write_json(staging / "training.json", record)
            context.log.info(
                f"SAE {spec.name}: {json.dumps({k: v for k, v in record.items() if k != 'train_partitions'})}"
            )
            rows.append({k: v for k, v in record.items() if k != "train_partitions"})
        return dg.MaterializeResult(metadata={"saes": table_md(pl.DataFrame(rows))})

    @dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[sae_dictionary],
        code_version=code_version("2", run_config, upstream=[sae_dictionary]),
        group_name="sae",
        kinds={"pytorch"},
    )
    def sae_evaluation(
        context: dg.AssetExecutionContext,
        run: RunResource,
        storage: StorageResource,
        compute: ComputeResource,
    ) -> dg.MaterializeResult:
        """The metric suite (FVU computed by us, MSE, cosine, relative norm, L0, usage, encode
        throughput) of every SAE on held-out non-BOS tokens."""
        prof = run.config
        store = storage.activation_store()
        records = []
        for spec in prof.sae_specs:
            path = storage.path("saes", spec.name)
            dictionary = sae.load_dictionary(path, compute.resolved_device)
            training = json.loads((path / "training.json").read_text())
            heldout = metrics.evaluate(
                (x for x, _ in store.iter_tokens(prof.heldout_partition_keys)), dictionary, compute.resolved_device
            )
            record = {
                "name": spec.name,
                "family": spec.family,
                "m": spec.active_per_token,
                **training,
                **{f"heldout_{name}": value for name, value in heldout.items()},
            }
            records.append(record)
            context.log.info(f"SAE {spec.name}: held-out FVU {heldout['fvu']:.4f}, L0 {heldout['l0']:.1f}")
        write_json(storage.path("saes", "evaluation.json"), records)
        table = pl.DataFrame([{k: r[k] for k in ("name", "heldout_fvu", "heldout_mse", "heldout_l0")} for r in records])
        return dg.MaterializeResult(metadata={"heldout_metrics": table_md(table)})

    return [sae_dictionary, sae_evaluation]

"""downstream_loss and interpretation: every dictionary through the model and in front of a reader."""

import time

import dagster as dg
import numpy as np
import polars as pl
import torch

from gemma_assets.core import feature_pages, interpret, model, plots, splice
from gemma_assets.core.codes import centred_units
from gemma_assets.core.config import RunConfig
from gemma_assets.core.dictionaries import Member
from gemma_assets.core.files import write_json
from gemma_assets.core.stats import ActivationMoments
from gemma_assets.core.storage import ActivationStore
from gemma_assets.defs.common import FOLLOW_UPSTREAM, code_version, image_md, markdown_table, model_source
from gemma_assets.defs.dictionaries import clustering_members, sae_members
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource

CODE_BATCH = 4096  # tokens encoded at once (codes of 65k-latent SAEs stay in memory bounds)


def _round_trip(member: Member, device: str) -> splice.Replacement:
    def replace(x: torch.Tensor) -> torch.Tensor:
        dictionary = member.dictionary
        return dictionary.decode(dictionary.encode(x.to(device))).to(x.device)

    return replace


def heldout_windows(store: ActivationStore, keys: list[str], context_len: int, limit: int) -> np.ndarray:
    """Token windows [w, context_len] of the held-out partitions, at most `limit`."""
    windows = np.concatenate([store.open(key).array("token_ids").reshape(-1, context_len) for key in keys])[:limit]
    if not len(windows):
        raise ValueError(
            f"no held-out windows to measure the spliced cross-entropy on (partitions {keys}, limit {limit}): "
            "raise EvaluationSpec.ce_windows or sample more windows"
        )
    return windows


def load_eval_tokens(
    store: ActivationStore, keys: list[str], limit: int, context_len: int, width: int
) -> interpret.EvalTokens:
    """The first `limit` held-out non-BOS tokens, with contexts, strata and window ids."""
    xs, token_ids, strata, contexts, windows, taken = [], [], [], [], [], 0
    names: tuple[str, ...] = ()
    for key in keys:
        part = store.open(key)
        names = tuple(part.manifest["attrs"]["stratum_names"])
        all_ids = part.array("token_ids")
        for x, info in store.iter_tokens([key]):
            x, rows = x[: limit - taken], info["row"][: limit - taken]
            xs.append(x)
            token_ids.append(info["token_ids"][: len(rows)])
            strata.append(info["strata"][: len(rows)])
            contexts.append(interpret.contexts_of(all_ids, rows, context_len, width))
            windows.append(int(key) * 10**6 + rows // context_len)  # unique across partitions
            taken += len(rows)
            if taken >= limit:
                break
        if taken >= limit:
            break
    if not taken:
        raise ValueError(
            f"no held-out tokens to interpret features on (partitions {keys}, limit {limit}): "
            "raise EvaluationSpec.interpret_tokens or sample more windows"
        )
    return interpret.EvalTokens(
        torch.cat(xs),
        np.concatenate(token_ids),
        np.concatenate(strata).astype(np.int64),
        names,
        np.concatenate(contexts),
        np.concatenate(windows),
    )


def build_evaluation_assets(
    run_config: RunConfig,
    cluster_models: dg.AssetsDefinition,
    leader_clusters: dg.AssetsDefinition,
    sae_dictionary: dg.AssetsDefinition,
) -> list:
    @dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[cluster_models, leader_clusters, sae_dictionary],
        code_version=code_version(
            "1",
            run_config,
            ("clustering.ks", "evaluation.ce_windows", "evaluation.ce_batch_windows"),
            [cluster_models, leader_clusters, sae_dictionary],
        ),
        group_name="evaluation",
        pool="gpu",
        kinds={"pytorch"},
    )
    def downstream_loss(
        context: dg.AssetExecutionContext,
        run: RunResource,
        storage: StorageResource,
        compute: ComputeResource,
    ) -> dg.MaterializeResult:
        """Next-token cross-entropy on held-out windows with block L's output replaced by each
        dictionary's reconstruction: delta CE vs the clean model and loss recovered vs zero- and
        mean-ablation (SAELens' definitions)."""
        prof = run.config
        device = compute.resolved_device
        store = storage.activation_store()
        source = model_source(prof, storage)
        lm = model.load_model(source, prof.model.layer, device, compute.torch_dtype(prof.model.dtype))
        windows = heldout_windows(
            store, prof.heldout_partition_keys, prof.sampling.context_len, prof.evaluation.ce_windows
        )
        train_mean = torch.from_numpy(ActivationMoments.load(storage.path("stats", "train_moments.npz")).mean).float()
        members = clustering_members(storage, prof) + sae_members(storage, prof, device)
        replacements: dict[str, splice.Replacement | None] = {
            "clean": None,
            "zero-ablation": torch.zeros_like,
            "mean-ablation": lambda x: train_mean.to(x.device).expand_as(x),
        }
        for member in members:
            replacements[member.name] = _round_trip(member, device if member.family.startswith("SAE") else "cpu")
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            context.log.info(
                f"spliced CE: {done}/{total} windows x {len(replacements)} runs, {time.perf_counter() - started:.0f}s"
            )

        ce = splice.cross_entropies(
            lm, windows, prof.model.layer, replacements, prof.evaluation.ce_batch_windows, device, progress
        )
        clean, zero, mean = ce["clean"], ce["zero-ablation"], ce["mean-ablation"]
        records = [
            {
                "name": member.name,
                "family": member.family,
                "ce": ce[member.name],
                "delta_ce": ce[member.name] - clean,
                "loss_recovered_vs_zero": splice.loss_recovered(ce[member.name], clean, zero),
                "loss_recovered_vs_mean": splice.loss_recovered(ce[member.name], clean, mean),
            }
            for member in members
        ]
        result = {
            "windows": len(windows),
            "predicted_tokens": int(windows[:, 1:].size),
            "clean_ce": clean,
            "zero_ablation_ce": zero,
            "mean_ablation_ce": mean,
            "dictionaries": records,
        }
        path = storage.path("evaluation", "downstream.json")
        write_json(path, result)
        context.log.info(f"clean CE {clean:.4f}, zero-ablation {zero:.4f}, mean-ablation {mean:.4f} nats")
        return dg.MaterializeResult(
            metadata={
                "clean_ce": clean,
                "zero_ablation_ce": zero,
                "mean_ablation_ce": mean,
                "predicted_tokens": result["predicted_tokens"],
                "spliced": dg.MetadataValue.md(markdown_table(pl.DataFrame(records))),
            }
        )

    @dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[cluster_models, leader_clusters, sae_dictionary],  # the leader model is interpreted too
        # every evaluation key but the spliced cross-entropy's
        code_version=code_version(
            "1",
            run_config,
            ("clustering.ks", "evaluation"),
            [cluster_models, leader_clusters, sae_dictionary],
            exclude=("evaluation.ce_windows", "evaluation.ce_batch_windows"),
        ),
        group_name="evaluation",
        kinds={"pytorch", "html"},
    )
    def interpretation(
        context: dg.AssetExecutionContext,
        run: RunResource,
        storage: StorageResource,
        compute: ComputeResource,
    ) -> dg.MaterializeResult:
        """Clusters and SAE latents read side by side on held-out tokens: per-feature summaries
        and HTML pages, centroid/decoder alignment, activation-set F1 (as Exemplar Partitioning
        reports it) and sparse probes of source stratum and token class."""
        prof = run.config
        spec = prof.evaluation
        store = storage.activation_store()
        source = model_source(prof, storage)
        tokenizer = model.load_tokenizer(source)
        unembedding = model.load_model(source, prof.model.layer, "cpu", torch.float32).get_output_embeddings().weight
        decoded: dict[int, str] = {}

        def decode(token: int) -> str:
            if token not in decoded:
                decoded[token] = tokenizer.decode([token])
            return decoded[token]

        tokens = load_eval_tokens(
            store, prof.heldout_partition_keys, spec.interpret_tokens, prof.sampling.context_len, spec.context_width
        )
        mean = torch.from_numpy(ActivationMoments.load(storage.path("stats", "train_moments.npz")).mean).float()
        centred = centred_units(tokens.x, mean)
        clusters = [m for m in clustering_members(storage, prof) if m.family == "k-means"]
        latents = sae_members(storage, prof, compute.resolved_device)
        members = clusters + latents
        acts = {m.name: _activations(m, tokens.x, compute.resolved_device if m in latents else "cpu") for m in members}
        context.log.info(f"encoded {len(tokens.x)} held-out tokens with {len(members)} dictionaries")

        # alignment and activation-set agreement, every clustering against every SAE
        pairs, best_cosines = [], {}
        for cluster in clusters:
            labels = np.empty(acts[cluster.name].n_tokens, np.int64)
            labels[acts[cluster.name].token] = acts[cluster.name].feature
            for latent in latents:
                best_cl, match_cl, best_la, match_la = interpret.alignment(
                    cluster.dictionary.directions(), latent.dictionary.directions().cpu()
                )
                f1, _ = interpret.activation_f1(labels, cluster.dictionary.n_features, acts[latent.name])
                best_cosines[(cluster.name, latent.name)] = (best_cl, match_cl, best_la, match_la)
                pairs.append(
                    {
                        "clustering": cluster.name,
                        "sae": latent.name,
                        "median_best_cosine": float(best_cl.median()),
                        "clusters_with_twin": float((best_cl >= interpret.TWIN_COSINE).float().mean()),
                        "latents_with_twin": float((best_la >= interpret.TWIN_COSINE).float().mean()),
                        "mean_best_f1": float(f1.mean()),
                        "clusters_matched_f1": float((f1 > interpret.MATCH_F1).mean()),
                    }
                )
        largest = clusters[-1].name
        histogram = plots.alignment_histogram(
            {latent.name: best_cosines[(largest, latent.name)][0].numpy() for latent in latents},
            largest,
            storage.path("report", "alignment_histogram.png"),
        )

        probes = interpret.probe_table(tokens, members, acts, spec.probe_tokens, spec.probe_max_features, decode)
        context.log.info(
            "probes: " + ", ".join(f"{p['features']} {p['stratum_balanced_accuracy']:.3f}" for p in probes)
        )

        # pages, and a few example features per dictionary for the report
        pages: dict[str, str] = {}
        examples = {}
        for member in members:
            summaries = interpret.summarise(acts[member.name], tokens, centred)
            promoted, suppressed = interpret.logit_effects(member.dictionary.directions().cpu(), unembedding.detach())
            twins = _twins(member, clusters, latents, best_cosines)
            for summary in summaries:
                pages[f"{member.name}/feature-{summary['feature']:05d}.html"] = feature_pages.feature_page(
                    f"{member.name} feature {summary['feature']}",
                    summary,
                    tokens,
                    decode,
                    promoted[summary["feature"]].tolist(),
                    suppressed[summary["feature"]].tolist(),
                    twins[summary["feature"]],
                )
            pages[f"{member.name}/index.html"] = feature_pages.index_page(member.name, summaries, twins, decode)
            examples[member.name] = interpret.example_features(summaries, decode)
        pages["index.html"] = feature_pages.index_page_of_dictionaries(
            [(m.name, m.family, m.dictionary.n_features) for m in members]
        )
        site = storage.path("report", "features")
        feature_pages.write_site(site, pages)
        result = {"tokens": len(tokens.x), "alignment": pairs, "probes": probes, "examples": examples}
        write_json(storage.path("evaluation", "interpretation.json"), result)
        return dg.MaterializeResult(
            metadata={
                "pages": dg.MetadataValue.path(str(site / "index.html")),
                "alignment": dg.MetadataValue.md(markdown_table(pl.DataFrame(pairs))),
                "probes": dg.MetadataValue.md(markdown_table(pl.DataFrame(probes))),
                "alignment_histogram": image_md(histogram),
            }
        )

    return [downstream_loss, interpretation]


def _activations(member: Member, x: torch.Tensor, device: str) -> interpret.FeatureActivations:
    """Codes of every token, encoded on `device` in bounded batches, gathered on the CPU."""
    return interpret.FeatureActivations.from_codes(
        (member.dictionary.encode(x[i : i + CODE_BATCH].to(device)).to("cpu") for i in range(0, len(x), CODE_BATCH)),
        member.dictionary.n_features,
    )


def _twins(member: Member, clusters: list[Member], latents: list[Member], best: dict) -> list[str]:
    """Per feature, its best match in the other family (clusters: the SAE with most features;
    latents: the clustering with the largest k)."""
    if not clusters or not latents:
        return ["(no dictionary of the other family)"] * member.dictionary.n_features
    if member in clusters:
        other = max(latents, key=lambda m: m.dictionary.n_features)
        cosine, index, _, _ = best[(member.name, other.name)]
        return [f"{other.name} latent {int(j)} (cosine {float(c):.3f})" for c, j in zip(cosine, index, strict=True)]
    other = clusters[-1]
    _, _, cosine, index = best[(other.name, member.name)]
    return [f"{other.name} cluster {int(j)} (cosine {float(c):.3f})" for c, j in zip(cosine, index, strict=True)]

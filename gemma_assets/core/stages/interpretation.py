"""interpretation: clusters and SAE latents read side by side on held-out tokens."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gemma_assets.core import bootstrap, feature_pages, interpret, plots, progress
from gemma_assets.core.codes import Codes, centred_units
from gemma_assets.core.config import RunConfig, seed_name
from gemma_assets.core.dictionaries import Member
from gemma_assets.core.files import write_json
from gemma_assets.core.kmeans import KMeansDictionary
from gemma_assets.core.layout import RunLayout
from gemma_assets.core.methods import Method
from gemma_assets.core.records import Family
from gemma_assets.core.storage import ActivationStore, window_ids

CODE_BATCH = 4096  # tokens encoded at once (codes of 65k-latent SAEs stay in memory bounds)


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
            windows.append(window_ids(key, rows, context_len))
            taken += len(rows)
            if taken >= limit:
                break
        if taken >= limit:
            break
    if not taken:
        raise ValueError(
            f"no held-out tokens to interpret features on (partitions {keys}, limit {limit}): "
            "raise evaluation.interpret_tokens or sample more windows"
        )
    return interpret.EvalTokens(
        torch.cat(xs),
        np.concatenate(token_ids),
        np.concatenate(strata).astype(np.int64),
        names,
        np.concatenate(contexts),
        np.concatenate(windows),
    )


def _activations(member: Member, x: torch.Tensor, device: str) -> interpret.FeatureActivations:
    """Codes of every token, encoded on `device` in bounded batches, gathered on the CPU."""
    with progress.task(f"encoding {len(x):,} held-out tokens with {member.name}", len(x), "tokens") as encoded:

        def batches() -> Iterator[Codes]:
            for start in range(0, len(x), CODE_BATCH):
                yield member.dictionary.encode(x[start : start + CODE_BATCH].to(device)).to("cpu")
                encoded.update(min(start + CODE_BATCH, len(x)))

        return interpret.FeatureActivations.from_codes(batches(), member.dictionary.n_features)


@dataclass
class _Comparison:
    """Every clustering against every SAE: alignment of directions and activation-set F1."""

    pairs: list[dict]
    best: dict[tuple[str, str], tuple]  # (clustering, sae) -> interpret.alignment's four tensors

    @classmethod
    def of(
        cls,
        clusters: list[Member],
        latents: list[Member],
        acts: dict[str, interpret.FeatureActivations],
        device: str,
    ) -> _Comparison:
        pairs, best = [], {}
        # counted in cosines, the alignments' work (the F1s' is small beside it): a 16k x 65k pair
        # is 65,536 times a 64 x 256 one
        cosines = sum(c.dictionary.n_features * s.dictionary.n_features for c in clusters for s in latents)
        compared = progress.task("alignment and activation F1", cosines, "cosines").start()
        for cluster in clusters:
            labels = acts[cluster.name].labels()
            for latent in latents:
                aligned = interpret.alignment(
                    cluster.dictionary.directions(), latent.dictionary.directions().to(device), aligned=compared.advance
                )
                best_cl, _, best_la, _ = best[(cluster.name, latent.name)] = aligned
                f1, _ = interpret.activation_f1(labels, cluster.dictionary.n_features, acts[latent.name])
                matched = bootstrap.share_interval(f1 > interpret.MATCH_F1)  # resampling the clusters
                pairs.append(
                    {
                        "clustering": cluster.name,
                        "sae": latent.name,
                        "median_best_cosine": float(best_cl.median()),
                        "clusters_with_twin": float((best_cl >= interpret.TWIN_COSINE).float().mean()),
                        "latents_with_twin": float((best_la >= interpret.TWIN_COSINE).float().mean()),
                        "mean_best_f1": float(f1.mean()),
                        "clusters_matched_f1": matched.value,
                        "clusters_matched_f1_interval": [matched.low, matched.high],
                    }
                )
        compared.finish()
        return cls(pairs, best)

    def twins(self, member: Member, clusters: list[Member], latents: list[Member]) -> list[str]:
        """Per feature, its best match in the other family (clusters: the SAE with most features;
        latents: the clustering with the largest k)."""
        if not clusters or not latents:
            return ["(no dictionary of the other family)"] * member.dictionary.n_features
        if member in clusters:
            other = max(latents, key=lambda m: m.dictionary.n_features)
            cosine, index, _, _ = self.best[(member.name, other.name)]
            kind = "latent"
        else:
            other = clusters[-1]
            _, _, cosine, index = self.best[(other.name, member.name)]
            kind = "cluster"
        return [f"{other.name} {kind} {int(j)} (cosine {float(c):.3f})" for c, j in zip(cosine, index, strict=True)]


def _agreement(
    name: str, others: list[tuple[str, torch.Tensor]], a: torch.Tensor, matched: list[np.ndarray] | None
) -> list[dict]:
    """One row per refit of a dictionary with directions `a`: how many of its features have a
    twin among the refit's directions (`others`: name and directions, on the device to align on),
    and, for a clustering, how many of its clusters have a matching member set in the refit
    (`matched`: per refit, each cluster's best F1)."""
    if not others:  # a one-seed run, or a pretrained dictionary
        return []
    # counted in cosines, as the comparison of the families is: one 16k-wide refit at d 2304 is
    # 1.2 TFLOP, 20 s of a two-core CPU
    cosines = sum(len(a) * len(b) for _, b in others)
    rows = []
    with progress.task(f"seed agreement of {name}", cosines, "cosines") as aligned:
        for i, (other, b) in enumerate(others):
            best, _, _, _ = interpret.alignment(a, b, aligned=aligned.advance)
            row = {
                "dictionary": name,
                "other_seed": other,
                "median_best_cosine": float(best.median()),
                "features_with_twin": float((best >= interpret.TWIN_COSINE).float().mean()),
            }
            if matched is not None:  # resampling the clusters
                share = bootstrap.share_interval(matched[i] > interpret.MATCH_F1)
                row |= {"clusters_matched_f1": share.value, "clusters_matched_f1_interval": [share.low, share.high]}
            rows.append(row)
    return rows


def seed_agreement(
    layout: RunLayout,
    clusters: list[Member],
    latents: list[Member],
    replicas: Callable[[Member], list[Member]],
    tokens: interpret.EvalTokens,
    acts: dict[str, interpret.FeatureActivations],
    device: str,
) -> list[dict]:
    """How much of each dictionary reappears when it is refitted with another seed: k-means
    clusters of seed 0 with a twin centroid (cosine) and a matching member set (F1) in seed s,
    every other method's features of seed 0 (`replicas` gives a member's refits) with a twin
    decoder direction in seed s. The yardstick for the
    cluster-latent agreement: agreement below the seed-to-seed level is not evidence of
    different structure. Directions are aligned on `device`."""
    rows = []
    for cluster in clusters:
        if not isinstance(cluster.dictionary, KMeansDictionary):
            raise TypeError(f"{cluster.name} is not k-means: seed agreement refits k-means clusters only")
        k = cluster.dictionary.n_features
        labels = acts[cluster.name].labels()
        refits = [
            Member(
                seed_name(cluster.name, seed),
                cluster.family,
                KMeansDictionary(centroids, cluster.dictionary.preprocessor),
            )
            for seed, centroids in enumerate(layout.kmeans_seed_centroids(k), start=1)
        ]
        matched = [
            interpret.partition_f1(labels, _activations(refit, tokens.x, "cpu").labels(), k, k) for refit in refits
        ]
        others = [(refit.name, refit.dictionary.directions().to(device)) for refit in refits]
        rows += _agreement(cluster.name, others, cluster.dictionary.directions(), matched)
    for latent in latents:
        others = [(replica.name, replica.dictionary.directions().to(device)) for replica in replicas(latent)]
        rows += _agreement(latent.name, others, latent.dictionary.directions(), None)
    return rows


@dataclass(frozen=True)
class InterpretationRecord:
    result: dict  # what evaluation/interpretation.json holds: tokens, alignment, probes, examples
    site: Path
    alignment_histogram: Path


def _pages(
    members: list[Member],
    acts: dict[str, interpret.FeatureActivations],
    tokens: interpret.EvalTokens,
    centred: torch.Tensor,
    unembedding: torch.Tensor,
    twins_of: Callable[[Member], list[str]],
    decode: Callable[[int], str],
    limit: int,
) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """Feature pages of every dictionary, and a few example features of each for the report."""
    pages: dict[str, str] = {}
    examples = {}
    written = progress.task("feature pages", sum(m.dictionary.n_features for m in members), "features").start()
    for member in members:
        summaries = interpret.summarise(acts[member.name], tokens, centred)
        chosen = sorted(range(len(summaries)), key=lambda f: -summaries[f]["count"])[: limit or None]
        directions = member.dictionary.directions()[torch.tensor(chosen, dtype=torch.long)]
        promoted_rows, suppressed_rows = interpret.logit_effects(directions.to(unembedding.device), unembedding)
        promoted = dict(zip(chosen, promoted_rows.tolist(), strict=True))
        suppressed = dict(zip(chosen, suppressed_rows.tolist(), strict=True))
        twins = twins_of(member)
        for summary in summaries:
            feature = summary["feature"]
            pages[f"{member.name}/feature-{feature:05d}.html"] = feature_pages.feature_page(
                f"{member.name} feature {feature}",
                summary,
                tokens,
                decode,
                promoted.get(feature, []),
                suppressed.get(feature, []),
                twins[feature],
            )
            written.advance()
        pages[f"{member.name}/index.html"] = feature_pages.index_page(member.name, summaries, twins, decode)
        examples[member.name] = interpret.example_features(summaries, decode)
    pages["index.html"] = feature_pages.index_page_of_dictionaries(
        [(m.name, m.family.label(m.dictionary.n_features), m.dictionary.n_features) for m in members]
    )
    written.finish()
    return pages, examples


def interpret_dictionaries(
    layout: RunLayout,
    run: RunConfig,
    methods: Sequence[Method],
    tokenizer,
    unembedding: torch.Tensor,
    device: str,
    log: Callable[[str], None],
) -> InterpretationRecord:
    """Per-feature summaries and HTML pages, centroid/decoder alignment, activation-set F1 (as
    Exemplar Partitioning reports it) and sparse probes of source stratum and token class, for
    the k-means models and what every other method interprets (its `latents`: the SAEs)."""
    spec = run.evaluation
    decoded: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in decoded:
            decoded[token] = tokenizer.decode([token])
        return decoded[token]

    store = layout.activation_store()
    keys, context_len = run.heldout_partition_keys, run.sampling.context_len
    tokens = load_eval_tokens(store, keys, spec.interpret_tokens, context_len, spec.context_width)
    centred = centred_units(tokens.x, torch.from_numpy(layout.moments("train").mean).float())
    interpreted = {id(m): (method, m) for method in methods for m in method.interpreted(layout, run, device)}
    members = [member for _, member in interpreted.values()]
    clusters = [m for m in members if m.family is Family.KMEANS]
    latents = [m for m in members if m.family is not Family.KMEANS]

    def replicas(member: Member) -> list[Member]:
        method, _ = interpreted[id(member)]
        return method.replicas(layout, run, member, "cpu")

    acts = {m.name: _activations(m, tokens.x, device if m.family.is_sae else "cpu") for m in members}
    log(f"encoded {len(tokens.x)} held-out tokens with {len(members)} dictionaries")
    comparison = _Comparison.of(clusters, latents, acts, device)
    largest = clusters[-1].name
    histogram = plots.alignment_histogram(
        {latent.name: comparison.best[(largest, latent.name)][0].numpy() for latent in latents},
        largest,
        layout.alignment_plot,
        interpret.TWIN_COSINE,
    )
    probes, probe_subset = interpret.probe_table(
        tokens, members, acts, spec.probe_tokens, spec.probe_max_features, decode
    )
    # a target whose classes cannot be balanced on these tokens (one stratum) has no probe
    targets = [t for t in ("stratum", "token_class") if f"{t}_balanced_accuracy" in probes[0]]
    log(
        f"probes, balanced accuracy of {' / '.join(targets) or 'no target'}: "
        + ", ".join(
            f"{p['features']} " + " / ".join(f"{p[f'{t}_balanced_accuracy']:.3f}" for t in targets) for p in probes
        )
    )
    twins_of = functools.partial(comparison.twins, clusters=clusters, latents=latents)
    # logit effects read every direction through the [vocab, d] unembedding: on the GPU when there is one
    pages, examples = _pages(
        members, acts, tokens, centred, unembedding.to(device), twins_of, decode, spec.logit_effect_features
    )
    feature_pages.write_site(layout.features_site, pages)
    agreement = seed_agreement(layout, clusters, latents, replicas, tokens, acts, device)
    result = {"tokens": len(tokens.x), "alignment": comparison.pairs, "seed_agreement": agreement}
    result |= {"probes": probes, "probe_subset": probe_subset}
    result["examples"] = examples
    write_json(layout.interpretation_file, result)
    return InterpretationRecord(result, layout.features_site, histogram)

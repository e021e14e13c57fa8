"""The comparison report: markdown rendered from the metric records, findings derived from numbers."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from gemma_assets.core.config import RunConfig
from gemma_assets.core.interpret import MATCH_F1, TWIN_COSINE
from gemma_assets.core.metrics import DENSE_SHARE
from gemma_assets.core.records import DictionaryRecord, Family, Markdown

COLUMNS = (
    "name",
    "family",
    "heldout_l0",
    "heldout_fvu",
    "heldout_mse",
    "heldout_cosine",
    "heldout_relative_norm",
    "delta_ce",
    "loss_recovered_vs_zero",
    "loss_recovered_vs_mean",
)
COST_COLUMNS = (
    "name",
    "parameters",
    "fit_seconds",
    "fit_peak_rss_mb",
    "heldout_encode_tokens_per_s",
    "heldout_dead_features",
    "heldout_dense_features",
    "heldout_usage_entropy_normalized",
)
QUALITY_COLUMNS = (
    "name",
    "heldout_simplified_silhouette",
    "heldout_silhouette_sampled",
    "heldout_davies_bouldin",
    "heldout_size_entropy",
    "heldout_dead_clusters",
    "heldout_tiny_clusters",
    "iterations",
)
ALIGNMENT_COLUMNS = (
    "clustering",
    "sae",
    "median_best_cosine",
    "clusters_with_twin",
    "latents_with_twin",
    "mean_best_f1",
    "clusters_matched_f1",
)
PROBE_COLUMNS = (
    "features",
    "l0",
    "stratum_balanced_accuracy",
    "stratum_retained",
    "token_class_balanced_accuracy",
    "token_class_retained",
)
PEER_MATCHED_SHARE = 0.20  # Exemplar Partitioning: ~20% of its regions match a Gemma Scope 16k latent at F1 > 0.5


def series(record: DictionaryRecord) -> str:
    """The line a dictionary belongs to on the L0 plots: SAEs by width, clusterings by family."""
    if record.family.is_sae:
        return f"SAE, {record.k} latents"
    return record.family.label(record.k)


class LeakageError(RuntimeError):
    """A model was fitted on held-out data; its held-out metrics would be meaningless."""


def check_no_leakage(records: list[DictionaryRecord], heldout_keys: list[str]) -> None:
    for record in records:
        leaked = sorted(set(record.train_partitions) & set(heldout_keys))
        if leaked:
            raise LeakageError(
                f"{record.name} was fitted on held-out partitions {leaked}: refit it on the "
                "train split (rematerialise it) before reporting"
            )


def git_revision() -> str:
    """HEAD's short hash, marked when tracked files differ from it (the numbers are then not
    reproducible from the hash alone)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()

    try:
        revision = git("rev-parse", "--short", "HEAD")
        return revision + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Markdown:
    """Rows as a markdown table of `columns` (a missing value is an empty cell)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return Markdown("\n".join(lines))


def frame_table(frame: pl.DataFrame) -> Markdown:
    return markdown_table(frame.iter_rows(named=True), frame.columns)


def findings(records: list[DictionaryRecord], interpretation: dict) -> list[str]:
    """Statements that follow from the numbers; nothing is claimed that they do not show."""
    kmeans = sorted((r for r in records if r.family is Family.KMEANS), key=lambda r: r.k)
    saes = [r for r in records if r.family.is_sae]
    lines = []
    if len(kmeans) > 1:
        first, last = kmeans[0], kmeans[-1]
        ce_first, ce_last = first.downstream.get("delta_ce"), last.downstream.get("delta_ce")
        lines.append(
            f"Raising k from {first.k} to {last.k} lowers the held-out FVU of k-means from "
            f"{first.fvu:.3f} to {last.fvu:.3f} at L0 = 1"
            + (
                f", and its spliced delta CE from {ce_first:.3f} to {ce_last:.3f} nats."
                if ce_first is not None and ce_last is not None
                else "."
            )
        )
    for km in kmeans:
        for sae in (s for s in saes if s.k == km.k and s.m == 1):
            verdict = "lower" if sae.fvu < km.fvu else "higher"
            lines.append(
                f"At L0 = 1 and {km.k} features, the TopK SAE {sae.name} has {verdict} held-out FVU "
                f"({sae.fvu:.3f}) than {km.name} ({km.fvu:.3f})."
            )
    if kmeans and saes:
        best_km = min(kmeans, key=lambda r: r.fvu)
        beating = [s for s in saes if s.fvu < best_km.fvu]
        if beating:
            sparsest = min(beating, key=lambda r: r.l0)
            lines.append(
                f"The sparsest SAE with lower FVU than the best k-means ({best_km.name}, "
                f"{best_km.fvu:.3f}) is {sparsest.name}: FVU {sparsest.fvu:.3f} at L0 {sparsest.l0:.1f}."
            )
        else:
            lines.append(f"No SAE reaches the held-out FVU of {best_km.name} ({best_km.fvu:.3f}).")
    recovered = [r for r in records if r.downstream.get("loss_recovered_vs_zero") is not None]
    if recovered:
        best = max(recovered, key=lambda r: r.downstream["loss_recovered_vs_zero"])
        worst = min(recovered, key=lambda r: r.downstream["loss_recovered_vs_zero"])
        lines.append(
            f"Loss recovered vs zero-ablation ranges from {worst.downstream['loss_recovered_vs_zero']:.3f} "
            f"({worst.name}) to {best.downstream['loss_recovered_vs_zero']:.3f} ({best.name})."
        )
    pairs = interpretation.get("alignment", [])
    if pairs:
        top = max(pairs, key=lambda p: p["clusters_matched_f1"])
        relation = "above" if top["clusters_matched_f1"] > PEER_MATCHED_SHARE else "at or below"
        lines.append(
            f"{top['clusters_matched_f1']:.0%} of {top['clustering']} clusters have a {top['sae']} latent with "
            f"activation-set F1 > {MATCH_F1} ({relation} the ~{PEER_MATCHED_SHARE:.0%} Exemplar Partitioning "
            f"reports against Gemma Scope 16k); {top['clusters_with_twin']:.0%} have a decoder direction within "
            f"cosine {TWIN_COSINE}."
        )
    probes = interpretation.get("probes", [])
    if len(probes) > 2:
        baseline, raw = probes[0], probes[1]
        for target, label in (("stratum", "the source stratum"), ("token_class", "the token class")):
            best = max(probes[2:], key=lambda p: p[f"{target}_retained"])
            lines.append(
                f"Probing {label}, raw activations reach {raw[f'{target}_balanced_accuracy']:.3f} balanced accuracy (majority class "
                f"{baseline[f'{target}_balanced_accuracy']:.3f}); the best code, {best['features']}, retains "
                f"{best[f'{target}_retained']:.0%} of it."
            )
    return lines


def _examples_md(examples: dict) -> str:
    lines = []
    for name, features in examples.items():
        for feature in features:
            tokens = ", ".join(f"`{t!r}`" for t in feature["top_tokens"])
            lines.append(
                f"- [{name} feature {feature['feature']}](features/{name}/feature-{feature['feature']:05d}.html): "
                f"{feature['count']} tokens, coherence {feature['coherence']:.3f}, stratum purity "
                f"{feature['stratum_purity']:.2f}; top tokens {tokens}"
            )
    return "\n".join(lines)


def findings_markdown(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines) or "- (not enough models)"


def render_markdown(
    profile: RunConfig,
    records: list[DictionaryRecord],
    data: dict,
    plots: dict[str, str],
    interpretation: dict,
    found: list[str],
    compute: dict,
) -> str:
    """The report: data, reconstruction and downstream loss, cost, clustering quality,
    interpretation, findings (`found`, from `findings`) and the exact configuration."""
    rows = [r.row() for r in records]
    kmeans = [r.row() for r in records if r.family is Family.KMEANS]
    findings_md = findings_markdown(found)
    downstream = data["downstream"]
    return f"""# Clustering vs sparse autoencoders — {profile.model.name}, block {profile.model.layer}

Run `{profile.name}`; hook `{profile.model.hook_name}`; git revision `{git_revision()}`.

## Data
- {data["train_tokens"]:,} train tokens (partitions {", ".join(profile.train_partition_keys)}) and
  {data["heldout_tokens"]:,} held-out tokens (partitions {", ".join(profile.heldout_partition_keys)}),
  windows of {profile.sampling.context_len} tokens.
- Every metric is computed on held-out tokens no model was fitted on. BOS tokens (position 0)
  are excluded from statistics, whitening, clustering and every metric: their norm is
  {data["bos_ratio"]:.1f}x that of other tokens (massive activations).
- FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, computed by this project in float64.
- Spliced cross-entropy: {downstream["predicted_tokens"]:,} next-token predictions on
  {downstream["windows"]} held-out windows with block {profile.model.layer}'s output replaced by the
  reconstruction at every position but BOS. Clean CE {downstream["clean_ce"]:.4f} nats,
  zero-ablation {downstream["zero_ablation_ce"]:.4f}, mean-ablation {downstream["mean_ablation_ce"]:.4f}.
  Loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean).

## Findings
{findings_md}

## Experiment 1: reconstruction and downstream loss on held-out tokens

k-means: a token is its nearest centroid (L0 = 1). Gain-shape: spherical k-means, a token is
its best direction times its projection (L0 = 1). top-m: greedy residual coding with m of the
k-means directions (L0 = m). Leader: Exemplar Partitioning's regions read as gain-shape. SAEs:
TopK, trained with SAELens on the train split.

{markdown_table(rows, COLUMNS)}

![L0-FVU frontier]({plots["frontier"]})

![delta CE against L0]({plots["delta_ce"]})

### Clustering quality across k (held-out tokens, in the space k-means was fitted in)

{markdown_table(kmeans, QUALITY_COLUMNS)}

![quality across k]({plots["quality"]})

## Experiment 2: computational cost

Fit time and peak memory (RSS growth) of fitting; encode throughput on held-out tokens;
dictionary usage on held-out tokens (dead: never active; dense: active on more than {DENSE_SHARE:.0%} of tokens).

{markdown_table(rows, COST_COLUMNS)}

## Experiment 3: feature interpretation

{interpretation["tokens"]:,} held-out tokens. Browse every cluster and latent: [feature pages](features/index.html).

### Alignment and activation-set agreement

Best cosine between each centred centroid and the SAE decoder directions (twin: cosine >= {TWIN_COSINE});
F1 between a cluster's members and the same number of top-activating tokens of a latent, best
latent per cluster (matched: F1 > {MATCH_F1}, Exemplar Partitioning's criterion).

{markdown_table(interpretation["alignment"], ALIGNMENT_COLUMNS)}

![alignment histogram]({plots["alignment"]})

### Sparse probing

Logistic probes trained on even held-out windows and tested on odd ones, scored by balanced
accuracy (mean recall over classes: the strata are far from equal in size); retained = balanced
accuracy / that of raw activations.

{markdown_table(interpretation["probes"], PROBE_COLUMNS)}

### Example features (most coherent among the frequently active)

{_examples_md(interpretation["examples"])}

## Configuration

Run `{profile.name}`, config digest `{profile.digest()}` (saved beside the outputs as `run_config.yaml`);
computed on {", ".join(f"{key} {value}" for key, value in compute.items())}.

```yaml
{profile.to_yaml()}```
"""


def render_html(markdown_text: str, title: str) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}img{max-width:100%}</style></head>"
        f"<body>{body}</body></html>"
    )

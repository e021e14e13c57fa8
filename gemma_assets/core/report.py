"""The comparison report: markdown rendered from the metric records, findings derived from numbers."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from gemma_assets.core.bootstrap import DRAWS, LEVEL, Comparison, Evidence, Interval
from gemma_assets.core.config import RunConfig
from gemma_assets.core.environment import describe
from gemma_assets.core.interpret import MATCH_F1, TWIN_COSINE
from gemma_assets.core.metrics import DENSE_SHARE
from gemma_assets.core.records import DictionaryRecord, Family, Markdown, SeedSpread

# the spliced CE's reference points, as report.json carries them
SPLICED_BASELINES = ("windows", "predicted_tokens", "clean_ce", "zero_ablation_ce", "mean_ablation_ce")
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
SEED_COLUMNS = (
    "name",
    "seeds",
    "fvu_mean",
    "fvu_sd",
    "fvu_min",
    "fvu_max",
    "mse_mean",
    "mse_sd",
    "cosine_mean",
    "cosine_sd",
    "l0_mean",
)
SEED_AGREEMENT_COLUMNS = ("dictionary", "other_seed", "median_best_cosine", "features_with_twin", "clusters_matched_f1")
INTERVAL_METRICS = ("fvu", "mse", "cosine", "l0")
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
    if isinstance(value, Interval):
        return value.format()
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


def verdict(comparison: Comparison, lower: str = "lower", higher: str = "higher") -> str:
    """How A stands against B: a direction only when the paired interval excludes no difference."""
    if comparison.resolved:
        return lower if comparison.difference.value < 0 else higher
    return "indistinguishable"


def spread(comparison: Comparison) -> str:
    """The paired interval behind a verdict, and when unresolved, the windows that would resolve it."""
    d = comparison.difference
    if not d.bounded:
        return f"difference {d.value:+.3f} on {comparison.windows} window: no interval (a bootstrap needs two or more)"
    text = f"paired difference {d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] over {comparison.windows} windows"
    needed = None if comparison.resolved else comparison.windows_to_resolve()
    return text + (f"; about {needed:,} windows would resolve it" if needed else "")


def _seed_ranges_apart(a: str, b: str, spreads: Mapping[str, SeedSpread]) -> bool:
    """Whether the refits of a and b keep their order in held-out FVU (their ranges over seeds do
    not overlap); True where either was fitted once."""
    if a not in spreads or b not in spreads:
        return True
    fvu_a, fvu_b = spreads[a].values["fvu"], spreads[b].values["fvu"]
    return max(fvu_a) < min(fvu_b) or max(fvu_b) < min(fvu_a)


def findings(
    records: list[DictionaryRecord], interpretation: dict, evidence: Evidence, spreads: Sequence[SeedSpread] = ()
) -> list[str]:
    """Statements that follow from the numbers; a difference is claimed only where its paired
    interval over held-out windows excludes zero and, for FVU, the two dictionaries' ranges over
    seeds (where both have refits) do not overlap."""
    kmeans = sorted((r for r in records if r.family is Family.KMEANS), key=lambda r: r.k)
    saes = [r for r in records if r.family.is_sae]
    over_seeds = {spread.name: spread for spread in spreads}

    def compare_fvu(a: str, b: str) -> tuple[str, str]:
        comparison = evidence.compare(a, b, "fvu")
        if comparison.resolved and not _seed_ranges_apart(a, b, over_seeds):
            return "indistinguishable", f"{spread(comparison)}, but their ranges over seeds overlap"
        return verdict(comparison), spread(comparison)

    lines = []
    if len(kmeans) > 1:
        first, last = kmeans[0], kmeans[-1]
        fvu_verdict, fvu_spread = compare_fvu(last.name, first.name)
        change = {"lower": "lowers", "higher": "raises"}.get(fvu_verdict, "leaves indistinguishable")
        line = (
            f"Raising k from {first.k} to {last.k} {change} the held-out FVU of k-means at L0 = 1 "
            f"({first.fvu:.3f} to {last.fvu:.3f}; {fvu_spread})"
        )
        if first.name in evidence.ce and last.name in evidence.ce:
            ce = evidence.compare_delta_ce(last.name, first.name)
            line += (
                f"; its spliced delta CE goes from {first.downstream['delta_ce']:.3f} to "
                f"{last.downstream['delta_ce']:.3f} nats, {verdict(ce)} ({spread(ce)})"
            )
        lines.append(line + ".")
    for km in kmeans:
        for sae in (s for s in saes if s.k == km.k and s.m == 1):
            fvu_verdict, fvu_spread = compare_fvu(sae.name, km.name)
            stands = {"lower": "a lower held-out FVU than", "higher": "a higher held-out FVU than"}
            line = (
                f"At L0 = 1 and {km.k} features, the TopK SAE {sae.name} has "
                f"{stands.get(fvu_verdict, 'a held-out FVU indistinguishable from that of')} {km.name} "
                f"({sae.fvu:.3f} vs {km.fvu:.3f}; {fvu_spread})"
            )
            if sae.name in evidence.ce and km.name in evidence.ce:
                ce = evidence.compare_delta_ce(sae.name, km.name)
                line += (
                    f"; its spliced delta CE is {verdict(ce)} ({sae.downstream['delta_ce']:.3f} vs "
                    f"{km.downstream['delta_ce']:.3f} nats; {spread(ce)})"
                )
            lines.append(line + ".")
    if kmeans and saes:
        best_km = min(kmeans, key=lambda r: r.fvu)
        beating = [s for s in saes if compare_fvu(s.name, best_km.name)[0] == "lower"]
        if beating:
            sparsest = min(beating, key=lambda r: r.l0)
            lines.append(
                f"The sparsest SAE whose held-out FVU is lower than the best k-means ({best_km.name}, "
                f"{best_km.fvu:.3f}) beyond its interval is {sparsest.name}: FVU {sparsest.fvu:.3f} at L0 "
                f"{sparsest.l0:.1f} ({compare_fvu(sparsest.name, best_km.name)[1]})."
            )
        else:
            lines.append(
                f"No SAE has a held-out FVU lower than {best_km.name} ({best_km.fvu:.3f}) beyond its interval."
            )
    recovered = [r for r in records if r.name in evidence.ce]
    if recovered:
        best = max(recovered, key=lambda r: r.downstream["loss_recovered_vs_zero"])
        worst = min(recovered, key=lambda r: r.downstream["loss_recovered_vs_zero"])
        windows = len(evidence.ce[best.name])
        lines.append(
            f"Loss recovered vs zero-ablation ranges from {evidence.loss_recovered(worst.name, 'zero-ablation')} "
            f"({worst.name}) to {evidence.loss_recovered(best.name, 'zero-ablation')} ({best.name}), "
            + (f"with 95% intervals over {windows} windows." if windows > 1 else "on one window (no interval).")
        )
    pairs = interpretation.get("alignment", [])
    if pairs:
        top = with_row_intervals(max(pairs, key=lambda p: p["clusters_matched_f1"]))
        share = top["clusters_matched_f1"]
        share = share if isinstance(share, Interval) else Interval(share, share, share)
        relation = (
            "above"
            if share.low > PEER_MATCHED_SHARE
            else "below"
            if share.high < PEER_MATCHED_SHARE
            else "not distinguishable from"
        )
        lines.append(
            f"{share.value:.0%} [{share.low:.0%}, {share.high:.0%}] of {top['clustering']} clusters (interval resampling "
            f"the clusters) have a {top['sae']} latent with "
            f"activation-set F1 > {MATCH_F1} ({relation} the ~{PEER_MATCHED_SHARE:.0%} Exemplar Partitioning "
            f"reports against Gemma Scope 16k); {top['clusters_with_twin']:.0%} have a decoder direction within "
            f"cosine {TWIN_COSINE}."
        )
        own = [a for a in interpretation.get("seed_agreement", []) if a["dictionary"] == top["clustering"]]
        if own:
            refit = with_row_intervals(own[0])["clusters_matched_f1"]
            lines.append(
                f"Refitted with another seed ({own[0]['other_seed']}), {top['clustering']} finds {refit.value:.0%} "
                f"[{refit.low:.0%}, {refit.high:.0%}] of its own clusters again at F1 > {MATCH_F1}: cluster-latent "
                "agreement is read against this seed-to-seed level, not against 100%."
            )
    probes = [with_row_intervals(p) for p in interpretation.get("probes", [])]
    if len(probes) > 2:
        baseline, raw = probes[0], probes[1]
        for target, label in (("stratum", "the source stratum"), ("token_class", "the token class")):
            if f"{target}_retained" not in raw:
                left_out = interpretation.get("probe_subset", {}).get("strata_left_out", {})
                why = "; ".join(f"{name}: {reason}" for name, reason in left_out.items())
                lines.append(f"No probe of {label}: fewer than two strata can be balanced ({why}).")
                continue
            best = max(probes[2:], key=lambda p: p[f"{target}_retained"].value)
            retained = best[f"{target}_retained"]
            lines.append(
                f"Probing {label}, raw activations reach {raw[f'{target}_balanced_accuracy']} balanced accuracy "
                f"(majority class {baseline[f'{target}_balanced_accuracy'].value:.3f}); the best code, "
                f"{best['features']}, reaches {best[f'{target}_balanced_accuracy']} and retains {retained.value:.0%} "
                f"[{retained.low:.0%}, {retained.high:.0%}] of it (paired over the test windows)."
            )
    return lines


def with_row_intervals(row: dict[str, Any]) -> dict[str, Any]:
    """A stored row (a probe, an alignment pair) with each figure that has an `<name>_interval`
    beside it as an Interval."""
    shown = {key: value for key, value in row.items() if not key.endswith("_interval")}
    for key in shown:
        if f"{key}_interval" in row:
            shown[key] = Interval(row[key], *row[f"{key}_interval"])
    return shown


def with_intervals(record: DictionaryRecord, evidence: Evidence) -> dict[str, Any]:
    """A record's table row with each figure that has an interval shown as `value [low, high]`."""
    row = record.row()
    if record.name in evidence.windows:
        row |= {f"heldout_{metric}": evidence.metric(record.name, metric) for metric in INTERVAL_METRICS}
    if record.name in evidence.ce:
        row["delta_ce"] = evidence.delta_ce(record.name)
        row["loss_recovered_vs_zero"] = evidence.loss_recovered(record.name, "zero-ablation")
        row["loss_recovered_vs_mean"] = evidence.loss_recovered(record.name, "mean-ablation")
    return row


def _jsonable(value: Any) -> Any:
    """An interval as {value, low, high}; NaN as null (strict JSON parsers reject NaN)."""
    if isinstance(value, Interval):
        return {name: _jsonable(getattr(value, name)) for name in ("value", "low", "high")}
    return None if isinstance(value, float) and math.isnan(value) else value


def report_json(
    profile: RunConfig,
    rows: list[dict[str, Any]],
    spreads: list[SeedSpread],
    found: list[str],
    evidence: Evidence,
    downstream: Mapping[str, Any],
    environment: Mapping[str, str | int],
) -> dict[str, Any]:
    """The report's figures for programs: the numeric environment they were computed in, the
    clean and ablated CE, every dictionary's row, figures with an interval as {value, low, high};
    the spread over seeds; the findings."""
    any_ce = next(iter(evidence.ce.values()), ())
    return {
        "run": profile.name,
        "config_digest": profile.digest(),
        "git_revision": git_revision(),
        "numeric_environment": dict(environment),
        "spliced": {key: downstream[key] for key in SPLICED_BASELINES},
        "intervals": {
            "level": LEVEL,
            "bootstrap_draws": DRAWS,
            "resampled": "held-out windows",
            "heldout_windows": next(iter(evidence.windows.values())).n_windows if evidence.windows else 0,
            "ce_windows": len(any_ce),
        },
        "dictionaries": [{key: _jsonable(value) for key, value in row.items()} for row in rows],
        "seed_spread": [{key: _jsonable(v) for key, v in spread.row().items()} for spread in spreads],
        "findings": found,
    }


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


def _left_out(strata: dict[str, str]) -> str:
    if not strata:
        return "(every stratum kept)"
    return "(left out, too few tokens to balance: " + "; ".join(f"{name}, {why}" for name, why in strata.items()) + ")"


def _seeds_md(profile: RunConfig, spreads: list[SeedSpread]) -> str:
    if not spreads:
        return (
            f"One seed (`seeds: {profile.seeds}`): the spread over refits is not measured; set `seeds` to 3 "
            "or more to measure it."
        )
    return f"""k-means (and its gain-shape and top-m readings) and the trained SAEs, refitted with
seeds 0..{profile.seeds - 1}: mean, sample SD and range of the held-out metrics. The table above and the
spliced CE read seed 0; its intervals measure the sampling error of the held-out windows, this
table the noise of fitting.

{markdown_table([s.row() for s in spreads], SEED_COLUMNS)}"""


def _seed_agreement_md(rows: list[dict]) -> str:
    if not rows:
        return "One seed: no refit to compare with."
    return f"""How much of a dictionary reappears when it is refitted with another seed, on the same tokens:
centroids (decoder directions) of seed 0 with a twin in the refit (cosine >= {TWIN_COSINE}), and k-means
clusters whose member set matches a refit cluster's at F1 > {MATCH_F1}. Cluster-latent agreement
above is read against this level.

{markdown_table([with_row_intervals(r) for r in rows], SEED_AGREEMENT_COLUMNS)}"""


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
    environment: Mapping[str, str | int],
    rows: list[dict[str, Any]],
    spreads: list[SeedSpread],
) -> str:
    """The report: data, reconstruction and downstream loss, cost, clustering quality,
    interpretation, findings (`found`, from `findings`) and the exact configuration; `rows` are
    the records' table rows with their intervals (`with_intervals`)."""
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
- Intervals: `value [low, high]` is the estimate with its 95% percentile interval from
  {DRAWS:,} bootstrap resamples of the held-out *windows* (tokens of one window share their
  context and are not independent). A finding says one dictionary beats another only when the
  paired interval of the difference, on the same resampled windows, excludes zero, and for FVU
  also only when, where both were fitted with several seeds, their ranges over seeds do not overlap.

## Findings
{findings_md}

## Experiment 1: reconstruction and downstream loss on held-out tokens

k-means: a token is its nearest centroid (L0 = 1). Gain-shape: spherical k-means, a token is
its best direction times its projection (L0 = 1). top-m: greedy residual coding with m of the
k-means directions (L0 = m). Leader: Exemplar Partitioning's regions (a token's region is its
nearest exemplar on the sphere), read two ways: gain-shape on the exemplar direction (`leader-N`)
and the mean of the region's train tokens (`leader-N-mean`, k-means' reading of a cluster).
Exemplar Partitioning itself uses the exemplar as membership criterion and intervention
direction and defines no reconstruction; both readings are this project's. SAEs: TopK, trained
with SAELens on the train split.

{markdown_table(rows, COLUMNS)}

![L0-FVU frontier]({plots["frontier"]})

![delta CE against L0]({plots["delta_ce"]})

Error bars: the 95% interval over held-out windows (seed 0); the wide pale bar behind an FVU
point is its range over seeds, where the run has several.

### Spread over seeds

{_seeds_md(profile, spreads)}

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

{markdown_table([with_row_intervals(p) for p in interpretation["alignment"]], ALIGNMENT_COLUMNS)}

![alignment histogram]({plots["alignment"]})

### Agreement across seeds

{_seed_agreement_md(interpretation.get("seed_agreement", []))}

### Sparse probing

Logistic probes trained on even held-out windows and tested on odd ones, scored by balanced
accuracy (mean recall over classes); retained = balanced accuracy / that of raw activations, with
95% intervals from a bootstrap over the test windows (paired with the raw probe). Stratum probes
see a stratum-balanced subset of {interpretation["probe_subset"]["stratum_tokens"]:,} tokens
{_left_out(interpretation["probe_subset"]["strata_left_out"])}.

{markdown_table([with_row_intervals(p) for p in interpretation["probes"]], PROBE_COLUMNS)}

### Example features (most coherent among the frequently active)

{_examples_md(interpretation["examples"])}

## Configuration

Run `{profile.name}`, config digest `{profile.digest()}` (saved beside the outputs as `run_config.yaml`);
computed on {", ".join(f"{key} {value}" for key, value in compute.items())}.

Numeric environment (of the process that wrote this report): {describe(environment)}.
Figures computed elsewhere agree with these to the tolerances in docs/reproducibility.md, not
to the last digit; `gemma-assets verify-report` recomputes them and says which agree.

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

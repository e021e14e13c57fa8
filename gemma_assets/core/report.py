"""The comparison report: markdown rendered from the metric records, findings derived from numbers."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from gemma_assets.core.bootstrap import DRAWS, LEVEL, Evidence, Interval
from gemma_assets.core.config import RunConfig
from gemma_assets.core.environment import describe
from gemma_assets.core.findings import with_row_intervals
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

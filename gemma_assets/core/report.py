"""The comparison report: markdown rendered from the metric records, findings derived from numbers."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import polars as pl

from gemma_assets.core.bootstrap import DRAWS, LEVEL, Evidence, Interval
from gemma_assets.core.config import RunConfig
from gemma_assets.core.environment import describe
from gemma_assets.core.findings import with_row_intervals
from gemma_assets.core.interpret import MATCH_F1, TWIN_COSINE
from gemma_assets.core.metrics import DENSE_SHARE
from gemma_assets.core.records import DictionaryRecord, Family, Markdown, SeedSpread

# the report's markdown is a template file; its numbers are formatted there
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("gemma_assets.core", "templates"),
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
    autoescape=False,
)
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
    "loss_recovered_vs_mean",
    "loss_recovered_vs_zero",
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
    """The line a dictionary belongs to on the L0 plots: SAEs and floors by family and width,
    clusterings by family."""
    if record.family.is_sae or record.family.is_floor:
        return f"{record.family.label(record.k)}, {record.k} {'latents' if record.family.is_sae else 'atoms'}"
    return record.family.label(record.k)


def by_family(
    records: Sequence[DictionaryRecord], rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> Markdown:
    """One table per family, in the order families first appear (a record and its row share an index)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record, row in zip(records, rows, strict=True):
        groups.setdefault(record.family.heading, []).append(row)
    return Markdown(
        "\n\n".join(f"**{heading}**\n\n{markdown_table(group, columns)}" for heading, group in groups.items())
    )


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


def checkpoint_note(run: RunConfig) -> str:
    """What the report says of the model's checkpoint where it is not the published one (the
    demo's quantised GGUF), and what that means for SAEs trained on the published one."""
    from gemma_assets.core.model import DEMO_CHECKPOINT

    if run.model.kind != "gguf_demo":
        return ""
    note = f"The model is {DEMO_CHECKPOINT}."
    if any(spec.release.startswith("gemma-scope-2") for spec in run.sae_specs):
        note += (
            " The Gemma Scope 2 SAEs were trained on the unquantised bf16 model, so their FVU here includes "
            "the quantisation's shift of the activations"
            + (" (the next line measures it)." if run.model.unquantised else ".")
        )
    return note


def quantisation_markdown(shift: dict) -> str:
    """The Data section's line on the quantisation (evaluation/quantisation_shift.json): the
    quantised activations read as a reconstruction of the unquantised model's, and each
    pretrained SAE's FVU on both, with sub-lines per SAE; or the line saying it was skipped."""
    if "skipped" in shift:
        return shift["skipped"]

    def figure(value: dict) -> str:
        return Interval(**value).format(".4g")

    lines = [
        f"Quantisation shift: on {shift['tokens']:,} non-BOS tokens of {shift['windows']} held-out windows, "
        f"block {shift['layer']}'s output of this model read as a reconstruction of the unquantised "
        f"`{shift['unquantised']}`'s has FVU {figure(shift['fvu'])}, cosine {figure(shift['cosine'])} and norm ratio "
        f"{figure(shift['relative_norm'])} (quantised / unquantised; 95% intervals over windows)."
    ]
    if shift["saes"]:
        lines[0] += " Each pretrained SAE's FVU on the unquantised -> quantised activations of the same tokens:"
    else:
        lines[0] += " The run loaded no pretrained SAE to read both with."
    lines += [
        f"  - {one['name']}: {figure(one['fvu_unquantised'])} -> {figure(one['fvu_quantised'])}, "
        f"difference {figure(one['fvu_difference'])} (paired)"
        for one in shift["saes"]
    ]
    return "\n".join(lines)


def render_markdown(
    run: RunConfig,
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
    """The report (templates/report.md.j2): data, findings (`found`), reconstruction and
    downstream loss, cost, clustering quality, interpretation and the exact configuration; `rows`
    are the records' table rows with their intervals (`with_intervals`)."""
    tables = {
        "reconstruction": by_family(records, rows, COLUMNS),
        "seeds": _seeds_md(run, spreads),
        "quality": markdown_table([r.row() for r in records if r.family is Family.KMEANS], QUALITY_COLUMNS),
        "cost": by_family(records, rows, COST_COLUMNS),
        "alignment": markdown_table([with_row_intervals(p) for p in interpretation["alignment"]], ALIGNMENT_COLUMNS),
        "seed_agreement": _seed_agreement_md(interpretation.get("seed_agreement", [])),
        "probes": markdown_table([with_row_intervals(p) for p in interpretation["probes"]], PROBE_COLUMNS),
    }
    return _TEMPLATES.get_template("report.md.j2").render(
        run=run,
        git_revision=git_revision(),
        data=data,
        draws=DRAWS,
        findings=findings_markdown(found),
        tables=tables,
        plots=plots,
        dense_share=DENSE_SHARE,
        interpretation=interpretation,
        twin_cosine=TWIN_COSINE,
        match_f1=MATCH_F1,
        strata_left_out=_left_out(interpretation["probe_subset"]["strata_left_out"]),
        examples=_examples_md(interpretation["examples"]),
        computed_on=", ".join(f"{key} {value}" for key, value in compute.items()),
        environment=describe(environment),
    )


def render_html(markdown_text: str, title: str) -> str:
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}img{max-width:100%}</style></head>"
        f"<body>{body}</body></html>"
    )

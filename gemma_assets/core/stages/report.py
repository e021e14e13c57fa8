"""comparison_report: every dictionary side by side on the same held-out tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemma_assets.core import plots, progress, report
from gemma_assets.core.bootstrap import Evidence, Interval
from gemma_assets.core.config import RunConfig, save_resolved
from gemma_assets.core.files import write_json, write_text
from gemma_assets.core.findings import findings
from gemma_assets.core.layout import RunLayout
from gemma_assets.core.methods import Method, all_records, all_seed_spreads, all_skipped, all_window_sums, skipped_line
from gemma_assets.core.records import DictionaryRecord, Family, SeedSpread, join_downstream
from gemma_assets.core.stages.downstream import by_name


@dataclass(frozen=True)
class ReportRecord:
    markdown: Path
    html: Path
    json: Path
    records: list[DictionaryRecord]
    rows: list[dict]  # the records' table rows, figures with an interval as Interval
    figures: dict[str, Path]
    findings: list[str]
    numeric_environment: dict[str, str | int]


def _figures(
    layout: RunLayout, records: list[DictionaryRecord], evidence: Evidence, spreads: list[SeedSpread]
) -> dict[str, Path]:
    over_seeds = {spread.name: spread for spread in spreads}

    def point(record: DictionaryRecord, value: float, window: Interval, seeds: Sequence[float] = ()) -> dict:
        row = {"name": record.name, "series": report.series(record), "l0": record.l0, "value": value}
        row["floor"] = record.family.is_floor
        row["bar"] = (window.low, window.high)
        return row | ({"seed_range": (min(seeds), max(seeds))} if seeds else {})

    fvu = [
        point(
            r, r.fvu, evidence.metric(r.name, "fvu"), over_seeds[r.name].values["fvu"] if r.name in over_seeds else ()
        )
        for r in records
        if r.name in evidence.windows
    ]
    delta_ce = [point(r, r.downstream["delta_ce"], evidence.delta_ce(r.name)) for r in records if r.name in evidence.ce]
    return {
        "frontier": plots.l0_frontier(
            fvu,
            layout.report_file("l0_fvu_frontier.png"),
            "FVU on held-out tokens (lower is better)",
        ),
        "delta_ce": plots.l0_frontier(
            delta_ce,
            layout.report_file("l0_delta_ce.png"),
            "spliced CE - clean CE, nats (lower is better)",
        ),
        "quality": plots.quality_across_k(
            [r.row() for r in records if r.family is Family.KMEANS], layout.report_file("quality_across_k.png")
        ),
        "alignment": layout.alignment_plot,
    }


def write_report(layout: RunLayout, run: RunConfig, methods: Sequence[Method]) -> ReportRecord:
    """Markdown and HTML report (PNG plots, feature pages) answering the three experiments:
    clustering quality across k, computational cost, feature interpretation; its figures with
    their intervals as report.json; the resolved config saved beside it. It names the device and
    numeric environment of the spliced CE, as downstream_loss recorded them."""
    downstream = layout.downstream()
    compute, environment = downstream["computed_on"], downstream["numeric_environment"]
    records = join_downstream(all_records(layout, run, methods), by_name(downstream))
    report.check_no_leakage(records, run.heldout_partition_keys)
    readings = layout.interpretation()
    save_resolved(run, layout.resolved_config_file)
    data = {
        "train_tokens": layout.moments("train").count,
        "heldout_tokens": layout.moments("heldout").count,
        "bos_ratio": layout.bos_ratio(),
        "downstream": downstream,
        "checkpoint": report.checkpoint_note(run),
        "quantisation": report.quantisation_markdown(layout.quantisation_shift()) if run.model.unquantised else "",
        "skipped": [skipped_line(name, why) for name, why in all_skipped(layout, run, methods).items()],
    }
    evidence = Evidence(
        all_window_sums(layout, run, methods),
        {name: np.asarray(losses) for name, losses in downstream["ce_per_window"].items()},
        downstream["predictions_per_window"],
    )
    spreads = all_seed_spreads(layout, run, methods)
    # the tables' figures
    rows = [
        report.with_intervals(record, evidence)
        for record in progress.tracked(records, "bootstrap intervals", unit="dictionaries")
    ]
    figures = _figures(layout, records, evidence, spreads)
    found = findings(records, readings, evidence, spreads, downstream["uniform_ce"])
    names = {name: path.name for name, path in figures.items()}
    markdown = report.render_markdown(run, records, data, names, readings, found, compute, environment, rows, spreads)
    path = layout.report_file("report.md")
    write_text(path, markdown)
    html = layout.report_file("report.html")
    write_text(html, report.render_html(markdown, f"gemma_assets report ({run.name})"))
    figures_json = layout.report_file("report.json")
    write_json(figures_json, report.report_json(run, rows, spreads, found, evidence, downstream, environment))
    return ReportRecord(path, html, figures_json, records, rows, figures, found, environment)

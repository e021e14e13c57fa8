"""comparison_report: every dictionary side by side on the same held-out tokens."""

import json

import dagster as dg
import polars as pl

from gemma_assets.core import plots, report
from gemma_assets.core.config import RESOLVED_CONFIG_FILE, RunConfig, save_resolved
from gemma_assets.core.files import write_text
from gemma_assets.core.stats import ActivationMoments
from gemma_assets.defs.clustering import load_cluster_metrics
from gemma_assets.defs.common import FOLLOW_UPSTREAM, code_version, image_md, markdown_table
from gemma_assets.defs.resources import ComputeResource, RunResource, StorageResource


def build_report_asset(
    run_config: RunConfig,
    cluster_models: dg.AssetsDefinition,
    leader_clusters: dg.AssetsDefinition,
    sae_evaluation: dg.AssetsDefinition,
    downstream_loss: dg.AssetsDefinition,
    interpretation: dg.AssetsDefinition,
) -> dg.AssetsDefinition:
    @dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[cluster_models, leader_clusters, sae_evaluation, downstream_loss, interpretation],
        # the report prints the whole resolved config
        code_version=code_version(
            "2", run_config, ("",), [cluster_models, leader_clusters, sae_evaluation, downstream_loss, interpretation]
        ),
        group_name="report",
        kinds={"markdown", "html"},
    )
    def comparison_report(
        context: dg.AssetExecutionContext,
        run: RunResource,
        storage: StorageResource,
        compute: ComputeResource,
    ) -> dg.MaterializeResult:
        """Markdown and HTML report (PNG plots, feature pages) answering the three experiments:
        clustering quality across k, computational cost, feature interpretation."""
        prof = run.config
        records = load_cluster_metrics(storage, [str(k) for k in prof.clustering.ks])
        records.append(json.loads(storage.path("clusters", "leader", "metrics.json").read_text()))
        records += json.loads(storage.path("saes", "evaluation.json").read_text())
        report.check_no_leakage(records, prof.heldout_partition_keys)
        downstream = json.loads(storage.path("evaluation", "downstream.json").read_text())
        spliced = {r["name"]: r for r in downstream["dictionaries"]}
        for record in records:
            record.update({k: v for k, v in spliced.get(record["name"], {}).items() if k not in ("name", "family")})
        readings = json.loads(storage.path("evaluation", "interpretation.json").read_text())
        folder = storage.path("report")

        def l0_rows(key: str) -> list[dict]:
            return [
                {"name": r["name"], "series": report.series(r), "l0": r["heldout_l0"], "value": r[key]}
                for r in records
                if r.get(key) is not None
            ]

        figures = {
            "frontier": plots.l0_frontier(
                l0_rows("heldout_fvu"), folder / "l0_fvu_frontier.png", "FVU on held-out tokens (lower is better)"
            ),
            "delta_ce": plots.l0_frontier(
                l0_rows("delta_ce"), folder / "l0_delta_ce.png", "spliced CE - clean CE, nats (lower is better)"
            ),
            "quality": plots.quality_across_k(
                [r for r in records if r["family"] == "k-means"], folder / "quality_across_k.png"
            ),
            "alignment": folder / "alignment_histogram.png",
        }
        train = ActivationMoments.load(storage.path("stats", "train_moments.npz"))
        heldout = ActivationMoments.load(storage.path("stats", "heldout_moments.npz"))
        bos_ratio = json.loads(storage.path("stats", "bos.json").read_text())["bos_to_token_norm_ratio"]
        compute_facts = {
            "device": compute.resolved_device,
            "dtype": str(compute.torch_dtype(prof.model.dtype)),
            "batch_size": compute.batch_size,
        }
        save_resolved(prof, storage.path(RESOLVED_CONFIG_FILE))
        data = {
            "train_tokens": train.count,
            "heldout_tokens": heldout.count,
            "bos_ratio": bos_ratio,
            "downstream": downstream,
        }
        findings = report.findings(records, readings)
        markdown = report.render_markdown(
            prof, records, data, {name: path.name for name, path in figures.items()}, readings, findings, compute_facts
        )
        path = folder / "report.md"
        write_text(path, markdown)
        write_text(folder / "report.html", report.render_html(markdown, f"gemma_assets report ({prof.name})"))
        context.log.info(f"report written to {path} and {path.with_suffix('.html')}")
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.path(str(path)),
                "report_html": dg.MetadataValue.path(str(path.with_suffix(".html"))),
                "heldout_metrics": dg.MetadataValue.md(
                    markdown_table(pl.DataFrame([{c: r.get(c) for c in report.COLUMNS} for r in records]))
                ),
                **{f"plot_{name}": image_md(figure) for name, figure in figures.items()},
                "findings": dg.MetadataValue.md(report.findings_markdown(findings)),
            }
        )

    return comparison_report

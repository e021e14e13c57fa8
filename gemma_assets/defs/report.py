"""comparison_report: every dictionary side by side on the same held-out tokens."""

import dataclasses
import json

import dagster as dg
import polars as pl

from gemma_assets.core import plots, report
from gemma_assets.core.stats import ActivationMoments
from gemma_assets.defs.clustering import load_cluster_metrics
from gemma_assets.defs.common import FOLLOW_UPSTREAM, image_md, markdown_table
from gemma_assets.defs.resources import ComputeResource, ProfileResource, StorageResource


def build_report_asset(
    cluster_models: dg.AssetsDefinition, leader_clusters: dg.AssetsDefinition, sae_evaluation: dg.AssetsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        automation_condition=FOLLOW_UPSTREAM,
        deps=[cluster_models, leader_clusters, sae_evaluation],
        code_version="1",
        group_name="report",
        kinds={"markdown"},
    )
    def comparison_report(
        context: dg.AssetExecutionContext,
        profile: ProfileResource,
        storage: StorageResource,
        compute: ComputeResource,
    ) -> dg.MaterializeResult:
        """Markdown report (and PNG frontier plot) comparing k-means and SAEs on held-out tokens."""
        prof = profile.profile
        records = load_cluster_metrics(storage, [str(k) for k in prof.kmeans.ks])
        records.append(json.loads(storage.path("clusters", "leader", "metrics.json").read_text()))
        records += json.loads(storage.path("saes", "evaluation.json").read_text())
        report.check_no_leakage(records, prof.heldout_partition_keys)
        for record in records:
            record.setdefault("fit_seconds", None)
        train = ActivationMoments.load(storage.path("stats", "train_moments.npz"))
        heldout = ActivationMoments.load(storage.path("stats", "heldout_moments.npz"))
        bos_ratio = json.loads(storage.path("stats", "bos.json").read_text())["bos_to_token_norm_ratio"]
        frontier = plots.l0_fvu_frontier(
            [
                {"name": r["name"], "family": r["family"], "l0": r["heldout_l0"], "fvu": r["heldout_fvu"]}
                for r in records
            ],
            storage.path("report", "l0_fvu_frontier.png"),
        )
        config = {
            "profile": dataclasses.asdict(prof),
            "compute": {"device": compute.resolved_device, "dtype": str(compute.torch_dtype)},
        }
        data = {"train_tokens": train.count, "heldout_tokens": heldout.count, "bos_ratio": bos_ratio}
        markdown = report.render_markdown(prof, records, data, frontier.name, config)
        path = storage.path("report", "report.md")
        path.write_text(markdown)
        table = pl.DataFrame([{c: r.get(c) for c in report.COLUMNS} for r in records])
        context.log.info(f"report written to {path}")
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.path(str(path)),
                "heldout_metrics": dg.MetadataValue.md(markdown_table(table)),
                "l0_fvu_frontier": image_md(frontier),
                "findings": dg.MetadataValue.md("\n".join(f"- {line}" for line in report.findings(records))),
            }
        )

    return comparison_report

"""Reproduce a report: recompute the held-out FVU, L0 and spliced CE of a finished run's
dictionaries from its stored activations and dictionaries, in this process's numeric
environment, and hold each against the report at the tolerance its arithmetic allows
(`core.tolerances`). What `gemma-assets verify-report` runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gemma_assets.core import metrics, remote, tolerances
from gemma_assets.core.config import ConfigError, RunConfig, parse_resolved
from gemma_assets.core.dictionaries import Member
from gemma_assets.core.layout import RunLayout
from gemma_assets.core.stages.downstream import CE_BASELINES, spliced_losses
from gemma_assets.core.tolerances import Tolerance

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Agreement:
    """One figure of the report beside its recomputation."""

    dictionary: str
    figure: str
    reported: float
    recomputed: float
    tolerance: Tolerance

    @property
    def difference(self) -> float:
        return self.recomputed - self.reported

    @property
    def agrees(self) -> bool:
        return self.tolerance.allows(self.reported, self.recomputed)


@dataclass(frozen=True)
class ReportToVerify:
    """A report folder's report.json and the run config it was computed from."""

    figures: dict
    run: RunConfig
    layout: RunLayout

    @classmethod
    def open(cls, report_dir: Path, data_root: str, activations_url: str = "") -> ReportToVerify:
        """The report in `report_dir` and its run under `data_root` (the activation store at
        `activations_url` where the run kept it elsewhere)."""
        figures_file = report_dir / "report.json"
        try:
            figures = json.loads(figures_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(
                f"cannot read {figures_file} ({error}) -> pass the folder that holds report.md and report.json"
            ) from None
        if "numeric_environment" not in figures:
            raise ConfigError(
                f"{figures_file} names no numeric environment: it was written before reports recorded one "
                "-> rematerialise comparison_report (gemma-assets materialize) and verify the new report"
            )
        layout = RunLayout.of(data_root, figures["run"], activations_url)
        if layout.remote:  # the steps may have run on another machine: their artefacts come from the remote
            remote.pull(layout, remote.committed_assets(layout))
        config_file = layout.resolved_config_file
        if not config_file.exists():
            raise ConfigError(
                f"the data root {data_root} holds no run {figures['run']!r} ({config_file} is missing) "
                "-> pass --data-root with the folder the report's run was computed in"
            )
        # the resolved config as the run saved it, without the checks of a new run (its corpus
        # files need not exist here: verification reads the stored activations only)
        run = parse_resolved(config_file.read_text())
        if run.digest() != figures["config_digest"]:
            raise ConfigError(
                f"the report was computed from config digest {figures['config_digest']}, but {config_file} has "
                f"digest {run.digest()} -> pass the data root of the run that wrote this report, or rematerialise it"
            )
        return cls(figures, run, layout)

    @property
    def forward_dtype(self) -> torch.dtype:
        return getattr(torch, self.figures["numeric_environment"]["forward_dtype"])

    @property
    def predictions(self) -> int:
        return self.figures["spliced"]["predicted_tokens"]

    @property
    def heldout_tokens(self) -> int:
        return self.figures["dictionaries"][0]["heldout_n_tokens"]

    def reported(self) -> dict[str, dict[str, float]]:
        """Held-out FVU and L0 and spliced CE of each dictionary, and the CE baselines, by name."""
        spliced = self.figures["spliced"]
        found: dict[str, dict[str, float]] = {"(model)": {name: spliced[name] for name in CE_BASELINES}}
        for row in self.figures["dictionaries"]:
            figures = {"heldout_fvu": _value(row["heldout_fvu"]), "heldout_l0": _value(row["heldout_l0"])}
            if row.get("delta_ce") is not None:
                figures["spliced_ce"] = spliced["clean_ce"] + _value(row["delta_ce"])
            found[row["name"]] = figures
        return found


def _value(figure: float | dict) -> float:
    return figure["value"] if isinstance(figure, dict) else figure


def recompute(
    report: ReportToVerify,
    members: list[Member],
    lm: PreTrainedModel,
    device: str,
    log: Callable[[str], None],
) -> dict[str, dict[str, float]]:
    """The figures of `report.reported()` recomputed for `members` (clusterings encode on the CPU,
    SAEs on `device`, as the run did) with the language model `lm`."""
    heldout_tokens = report.layout.activation_store().batches(report.run.heldout_partition_keys)
    found: dict[str, dict[str, float]] = {}
    for member in members:
        log(f"held-out FVU and L0 of {member.name}")
        heldout = metrics.evaluate(heldout_tokens(), member.dictionary, device if member.family.is_sae else "cpu")
        found[member.name] = {"heldout_fvu": heldout["fvu"], "heldout_l0": heldout["l0"]}
    log("spliced CE of every dictionary")
    spliced = spliced_losses(report.layout, report.run, lm, members, device)
    found["(model)"] = {name: getattr(spliced, name) for name in CE_BASELINES}
    for row in spliced.dictionaries:
        found[row.name]["spliced_ce"] = row.ce
    return found


def compare(
    reported: dict[str, dict[str, float]],
    recomputed: dict[str, dict[str, float]],
    forward_dtype: torch.dtype,
    predictions: int,
    heldout_tokens: int,
) -> list[Agreement]:
    """Every reported figure beside its recomputation and tolerance (`predictions`: how many
    next-token predictions the spliced CE averages; `heldout_tokens`: how many tokens the
    held-out figures average). A reported figure that was not recomputed (its dictionary is not
    in the data root) is refused: it cannot be said to agree."""
    missing = [
        f"{figure} of {name}"
        for name, figures in reported.items()
        for figure in figures
        if figure not in recomputed.get(name, {})
    ]
    if missing:
        raise ConfigError(
            f"the data root cannot recompute {len(missing)} of the report's figures ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): its run lacks those dictionaries -> pass the data root of "
            "the run that wrote this report"
        )
    applies = {
        "heldout_fvu": tolerances.HELDOUT_FVU,
        "heldout_l0": tolerances.heldout_l0(heldout_tokens),
        "spliced_ce": tolerances.spliced_cross_entropy(forward_dtype, predictions),
        **{name: tolerances.cross_entropy(forward_dtype) for name in CE_BASELINES},
    }
    return [
        Agreement(name, figure, value, recomputed[name][figure], applies[figure])
        for name, figures in reported.items()
        for figure, value in figures.items()
    ]


def table(agreements: list[Agreement]) -> str:
    """A fixed-width table, one figure a line, then what each figure's tolerance allows for."""
    lines = [
        f"{'dictionary':<28} {'figure':<18} {'report':>14} {'recomputed':>14} {'difference':>11} {'tolerance':>10}  ",
    ]
    for a in agreements:
        verdict = "agrees" if a.agrees else "DIFFERS"
        lines.append(
            f"{a.dictionary:<28} {a.figure:<18} {a.reported:>14.8g} {a.recomputed:>14.8g} {a.difference:>+11.2e} "
            f"{a.tolerance.bound(a.reported):>10.2e}  {verdict}"
        )
    reasons = {a.figure: a.tolerance.why for a in agreements}
    lines += ["tolerances (docs/reproducibility.md):", *(f"  {figure}: {why}" for figure, why in reasons.items())]
    return "\n".join(lines)

"""The tiny run's reference figures and report text, compared at the tolerances the arithmetic
behind each figure allows, so that the references hold on every CPU (any vector width, BLAS or
thread count), not only on the one that wrote them. docs/reproducibility.md has the measurements.

Why the tolerances are what they are:

- The model and the corpus sample are the same on every machine (the tiny model's weights come
  from numpy's generator). The float32 forward pass is not: across kernel paths it differs in the
  7th-8th digit, and storing its output as bfloat16 turns that into one-ULP (2^-8 relative)
  differences in about 1 element in 10^4 (measured: 70 of 381k elements between AVX-512 and
  AVX2, 181 under `default`). Everything fitted on the stored activations starts from that.
- Figures that are sums over fixed fits (k-means, gain-shape, leader regions) move by far less
  than the perturbation of single elements: measured up to ~2e-5 relative. `FITTED` allows 1e-4
  relative.
- Figures that count tokens per cluster or feature (usage and size entropies, dead, tiny and
  dense counts, the sampled silhouette, Lloyd iterations) move by whole tokens: a token whose two
  nearest centroids tie within rounding changes cluster (measured: kmeans-256's usage entropy
  6.5471 -> 6.5482 bits under `default`). `ASSIGNMENTS` allows `FLIPS` tokens to change: each
  moves an entropy by at most (log2 n + 2) / n bits, a count by 1, a silhouette mean by 4 / n.
- Probes and agreement rates (balanced accuracy, retained share, the share of clusters found
  again at F1 > 0.5) turn whole predictions: one changed code refits the logistic probe (measured:
  0.4323 -> 0.4339). `DISCRETE` allows 0.03, about one prediction of the smallest class.
- CE figures: the clean and ablated CE come from the float32 forward pass alone
  (`tolerances.cross_entropy`, 1e-6 relative). A dictionary's spliced CE also carries its fit and
  its codes: a code decision that flips near a tie changes the CE of the predictions after it
  (`tolerances.spliced_cross_entropy`: 3 flips of 0.1 nats over 1,488 predictions, 2e-4 nats).
- Trained SAEs amplify the stored activations' one-ULP differences: TopK selection and the
  revival of dead latents are discrete, and a run elsewhere trains another draw of the fitting
  noise (measured: held-out figures 1e-4..2.7e-3 relative apart, spliced delta CE up to 50%). Their
  held-out figures are held to `SAE_SEED_SDS` standard deviations over seeds, the report's own
  measure of that noise, and never closer than `SAE_FLOOR` (two seeds can land close together); their spliced CE and the text that depends on which latents they learnt
  are not compared here. `gemma-assets verify-report` (test_verify_report) checks the evaluation
  of stored SAEs across environments at rounding-level tolerances instead. ITDA and the top-m
  readings of k-means are held the same way (`fitting_noise`): which tokens join ITDA's
  dictionary and which atom matching pursuit picks are discrete decisions that one ULP flips
  (measured under ATEN_CPU_CAPABILITY=default: ITDA's L0 1.6e-4 relative apart, a
  cluster-alignment share 0.3%; top16-kmeans-64's L0 and top16-kmeans-256's FVU interval bounds
  1.4e-4).
- Quantities that divide by a near-zero difference are compared through their inputs, never
  directly: loss recovered (the tiny model's ablations move CE by only ~0.005 nats), the windows a
  comparison would need, and the SD over two seeds (a difference of two close values).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import platform
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from gemma_assets.core import tolerances
from gemma_assets.core.config import RunConfig
from gemma_assets.core.dictionaries import TOP_M
from gemma_assets.core.itda import itda_name, itda_shapes
from gemma_assets.core.sampling import TokenSample
from gemma_assets.core.tolerances import Tolerance

FITTED = Tolerance(1e-4, 1e-9, "fits on stored activations that differ in ~1e-4 of their elements by one bfloat16 ULP")
FLIPS = 3  # held-out tokens whose cluster or code may change between numeric environments
DISCRETE = Tolerance(0.05, 0.03, "probe predictions and F1 thresholds turn on whole tokens")
COUNT_FIGURES = {"heldout_dead_clusters", "heldout_tiny_clusters", "heldout_dead_features", "heldout_dense_features"}
COUNT_FIGURES |= {"iterations", "dead_clusters_train"}
# Elkan's bounds skip a share of the distance computations of every iteration: one iteration more
# or less (a changed cluster near convergence) moves the share over the run by up to ~1/iterations
ITERATION_SHARES = Tolerance(0.0, 0.1, "a share over Lloyd iterations, whose count may change")
SHARE_FIGURES = {"heldout_size_entropy", "heldout_usage_entropy_bits", "heldout_usage_entropy_normalized"}
SHARE_FIGURES |= {"heldout_silhouette_sampled"}


def assignments(figure: str, heldout_tokens: int) -> Tolerance:
    """What FLIPS tokens changing cluster or code can do to a figure that counts tokens."""
    if figure in COUNT_FIGURES:
        return Tolerance(0.0, FLIPS, "a count of tokens' clusters")
    per_flip = (math.log2(heldout_tokens) + 2) / heldout_tokens  # >= 4 / n for n >= 4
    return Tolerance(0.0, FLIPS * per_flip, "a share of tokens' clusters")


TINY_PREDICTIONS = 1488  # the tiny run's spliced predictions: 48 windows x 31
SPLICED_NATS = tolerances.spliced_cross_entropy(torch.float32, TINY_PREDICTIONS)
FORWARD_CE = tolerances.cross_entropy(torch.float32)
SAE_SEED_SDS = 4.0
# relative: twice the largest spread measured across environments, for where two seeds happened to
# land close together. Measured: topk-256-k1's cosine, SD 2.9e-5 over seeds, 1.8e-4 relative apart
# on an AVX-512 EPYC; with every SAE trained in one pass, topk-128-k4's held-out MSE interval bound
# 2.7e-3 relative apart between AVX2 and `default` (its two seeds' FVUs 3e-4 apart)
SAE_FLOOR = 5e-3
MACHINE_FIGURES = {"fit_seconds", "fit_peak_rss_mb", "heldout_encode_tokens_per_s", "encode_tokens_per_s"}
THROUGH_INPUTS = {"loss_recovered_vs_zero", "loss_recovered_vs_mean"}  # ratios with a ~0.005-nat denominator
SPREAD_INPUTS = ("mean", "min", "max")  # the SD of two seeds is compared through min and max


def sample_identity(sample: TokenSample) -> dict[str, str]:
    """The Python that built the offline corpus, and a digest of the token windows sampled from it."""
    digest = hashlib.sha256()
    for array in (sample.tokens, sample.doc_ids, sample.starts, sample.strata):
        digest.update(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    digest.update("\n".join(sample.stratum_names).encode())
    return {"python": platform.python_version(), "digest": digest.hexdigest()}


def written_under(reference_file) -> pytest.MarkDecorator:
    """Skip a reference comparison, before the tiny run it needs, under another Python than the
    one the reference was sampled under (another offline corpus: require_the_reference_sample)."""
    import json

    python = json.loads(reference_file.read_text())["sample"]["python"]
    return pytest.mark.skipif(
        platform.python_version() != python,
        reason=f"the tiny reference was sampled from CPython {python}'s library; "
        f"CPython {platform.python_version()} builds another offline corpus",
    )


def require_the_reference_sample(reference: Mapping, sample: TokenSample) -> None:
    """The sample involves no float arithmetic: under the Python that wrote the reference it is
    the same on every machine, and a difference fails. The offline corpus is built from the
    running Python's own library, so under another Python version the reference does not apply
    and the comparison is skipped, saying so."""
    found = sample_identity(sample)
    if found["python"] != reference["sample"]["python"]:
        pytest.skip(
            f"the tiny reference was sampled from CPython {reference['sample']['python']}'s library; "
            f"CPython {found['python']} builds another offline corpus"
        )
    assert found["digest"] == reference["sample"]["digest"], "the tiny run sampled other token windows"


def reference_figures(report: Mapping, downstream: Mapping, sample: TokenSample) -> dict:
    """What the reference keeps of a run: its sample's identity, the CE baselines, every dictionary's figures (numbers;
    an interval as [value, low, high]) and their spread over seeds, minus what measures this
    machine's speed and what is compared through its inputs."""

    def number_or_interval(value):
        return [value["value"], value["low"], value["high"]] if isinstance(value, dict) else value

    dictionaries = {
        row["name"]: {
            key: number_or_interval(value)
            for key, value in row.items()
            if key not in MACHINE_FIGURES | THROUGH_INPUTS and _numeric(value)
        }
        for row in report["dictionaries"]
    }
    spreads = {
        spread["name"]: {k: v for k, v in spread.items() if k.endswith(SPREAD_INPUTS) and _numeric(v)}
        | {k: v for k, v in spread.items() if k.endswith("_sd")}
        for spread in report["seed_spread"]
    }
    baselines = {key: downstream[key] for key in ("clean_ce", "zero_ablation_ce", "mean_ablation_ce")}
    return {
        "sample": sample_identity(sample),
        "spliced": baselines,
        "dictionaries": dictionaries,
        "seed_spread": spreads,
    }


def _numeric(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(value[k], int | float) for k in ("value", "low", "high"))
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Mismatch:
    where: str
    reference: float
    found: float
    bound: float

    def __str__(self) -> str:
        return f"{self.where}: reference {self.reference!r}, found {self.found!r} (allowed +-{self.bound:.3g})"


def fitting_noise(run: RunConfig) -> list[str]:
    """The dictionaries whose fit or codes make discrete decisions on the stored activations, held
    to the trained SAEs' tolerances (module doc): every SAE of the run, every ITDA dictionary and
    every top-m (matching pursuit) reading of k-means."""
    saes = [spec.name for spec in run.sae_specs]
    itda = [itda_name(width, m) for width, m in itda_shapes(run)]
    top_m = [f"top{m}-kmeans-{k}" for k in run.clustering.ks for m in TOP_M if m < k]
    return saes + itda + top_m


def _sae_tolerance(spread: Mapping, figure: str, reference: float) -> float:
    metric = figure.removeprefix("heldout_")
    sd = spread.get(f"{metric}_sd") or 0.0
    return max(SAE_SEED_SDS * sd, SAE_FLOOR * abs(reference))


def compare_figures(reference: Mapping, found: Mapping, saes: Iterable[str]) -> list[Mismatch]:
    """Every reference figure that `found` moved beyond its tolerance (a figure missing counts)."""
    saes = set(saes)
    mismatches = []

    def check(where: str, ref: float, value: float | None, bound: float) -> None:
        if value is None or not (abs(value - ref) <= bound or (math.isnan(ref) and math.isnan(value))):
            mismatches.append(Mismatch(where, ref, value if value is not None else math.nan, bound))

    for key, ref in reference["spliced"].items():
        check(f"spliced/{key}", ref, found["spliced"].get(key), FORWARD_CE.bound(ref))
    for name, figures in reference["dictionaries"].items():
        row = found["dictionaries"].get(name, {})
        spread = reference["seed_spread"].get(name, {})
        for figure, ref in figures.items():
            refs, values = (ref, row.get(figure)) if isinstance(ref, list) else ([ref], [row.get(figure)])
            values = values if isinstance(values, list) else [None] * len(refs)
            for part, r, v in zip(("value", "low", "high"), refs, values, strict=False):
                where = f"{name}/{figure}" + ("" if len(refs) == 1 else f"/{part}")
                if figure == "delta_ce":
                    if name not in saes:  # a trained SAE's spliced CE is fitting noise here (module doc)
                        check(where, r, v, SPLICED_NATS.bound(r))
                elif name in saes:
                    if figure.startswith("heldout_") and figure.removeprefix("heldout_") in ("fvu", "mse", "cosine"):
                        check(where, r, v, _sae_tolerance(spread, figure, r))
                elif figure == "distances_skipped_share":
                    check(where, r, v, ITERATION_SHARES.bound(r))
                elif figure in COUNT_FIGURES | SHARE_FIGURES:
                    check(where, r, v, assignments(figure, figures["heldout_n_tokens"]).bound(r))
                elif isinstance(r, int) and not isinstance(r, bool):
                    check(where, r, v, 0.0)  # sizes of the data and the fit: no rounding moves them
                else:
                    check(where, r, v, FITTED.bound(r))
    for name, spread in reference["seed_spread"].items():
        if name in saes:
            continue
        row = found["seed_spread"].get(name, {})
        for figure, ref in spread.items():
            if not figure.endswith("_sd"):
                check(f"seed_spread/{name}/{figure}", ref, row.get(figure), FITTED.bound(ref))
    return mismatches


# -- the report's text ---------------------------------------------------------------------------

# a number standing alone (not inside a name such as kmeans-64, block 2's hook or a digest), with
# its sign, thousands separators, decimals, exponent and a trailing % or x (a full stop after it
# ends the sentence)
NUMBER = re.compile(r"(?<![\w.\-/])[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?(?:%|x(?!\w))?(?!\w|\.\d)")
TOKEN_LIST = re.compile(r"`'.*")  # the top tokens of an example feature, to the line's end
MASK = "#"
# loss recovered divides by CE_ablated - CE_clean, ~0.005 nats on the tiny model; the windows a
# comparison would need divide by its squared difference: both are compared through their inputs
BLANKED_COLUMNS = MACHINE_FIGURES | THROUGH_INPUTS
WINDOWS_TO_RESOLVE = re.compile(r"about [\d,]+ windows would resolve it")
LOSS_RECOVERED_FINDING = "Loss recovered vs zero-ablation ranges from"
# text figures: one unit in the last printed digit on top of these
TEXT = Tolerance(FITTED.rtol, SPLICED_NATS.atol, "differences of figures up to ~10 (CE in nats) carry their error")
TEXT_COUNTS = Tolerance(0.0, FLIPS, "a count of tokens' clusters")
TEXT_SHARES = Tolerance(0.0, 0.03, "entropies and silhouettes of tokens' clusters: FLIPS tokens")
DISCRETE_SECTIONS = ("### Sparse probing", "### Agreement across seeds")
DISCRETE_FINDINGS = ("- Probing the", "- Refitted with another seed")


@dataclass(frozen=True)
class Printed:
    """A number as the report prints it: its value and one unit in its last printed digit."""

    value: float
    unit: float

    @classmethod
    def parse(cls, text: str) -> Printed:
        body = text.rstrip("%x").replace(",", "")
        mantissa, _, exponent = body.lower().partition("e")
        decimals = len(mantissa.partition(".")[2])
        return cls(float(body), 10.0 ** (int(exponent or 0) - decimals))


@dataclass(frozen=True)
class Line:
    masked: str  # numbers (and, where it names a trained SAE, SAE names and token lists) masked
    numbers: list[tuple[Printed, Tolerance | None]]  # None: compared through its inputs instead
    names_sae: bool


def _cell_tolerance(column: str, line_tolerance: Tolerance) -> Tolerance:
    if column in COUNT_FIGURES:
        return TEXT_COUNTS
    return TEXT_SHARES if column in SHARE_FIGURES else line_tolerance


def masked_lines(markdown: str, sae_names: Iterable[str]) -> list[Line]:
    """Each line of a report that must not depend on the machine, its numbers masked and each
    number with its tolerance. Left out: the git revision, the numeric environment, the table
    columns that time this machine and those of loss recovered; a line that names a trained SAE
    has the SAE names and token lists masked too, and its numbers are not compared."""
    names = "|".join(re.escape(n) for n in sae_names)
    sae = re.compile(rf"\b(?:{names})(?:-seed\d+)?\b(?: \([^)]*\))?") if names else None
    lines: list[Line] = []
    header: list[str] = []
    section, in_environment = "", False
    for line in markdown.splitlines():
        if line.startswith("#"):
            section = line
        if line.startswith("Run `") and "git revision" in line:
            continue
        if line.startswith("Numeric environment"):
            in_environment = True
        if in_environment:
            in_environment = bool(line.strip())
            continue
        discrete = section.startswith(DISCRETE_SECTIONS) or line.startswith(DISCRETE_FINDINGS)
        line_tolerance = DISCRETE if discrete else TEXT
        if not line.startswith("|"):
            header = []
        cells = line.strip().strip("|").split("|") if line.startswith("|") else [line]
        if line.startswith("|") and not header:
            header = [cell.strip() for cell in cells]
        elif header and not set(line) <= set("|-: "):
            cells = [" - " if name in BLANKED_COLUMNS else cell for name, cell in zip(header, cells, strict=False)]
        names_sae = bool(sae and sae.search(line))
        numbers, masked_cells = [], []
        for index, cell in enumerate(cells):
            if sae and names_sae:
                cell = TOKEN_LIST.sub(MASK, sae.sub("<SAE>", cell))
            cell = WINDOWS_TO_RESOLVE.sub("about <N> windows would resolve it", cell)
            column = header[index] if header and index < len(header) else ""
            compared = not names_sae and LOSS_RECOVERED_FINDING not in line
            tolerance = _cell_tolerance(column, line_tolerance) if compared else None
            numbers += [(Printed.parse(m.group()), tolerance) for m in NUMBER.finditer(cell)]
            masked_cells.append(NUMBER.sub(MASK, cell))
        masked = "|" + "|".join(masked_cells) + "|" if line.startswith("|") else masked_cells[0]
        lines.append(Line(masked, numbers, names_sae))
    return lines


def compare_text(reference: str, found: str, sae_names: Iterable[str]) -> list[str]:
    """What differs between two reports beyond the machine: a masked line that is not the same
    (unless it names a trained SAE in either: fitting noise), or a printed number that moved more
    than one unit in its last digit plus its figure's tolerance."""
    sae_names = list(sae_names)
    ref, new = masked_lines(reference, sae_names), masked_lines(found, sae_names)
    problems = []
    matcher = difflib.SequenceMatcher(a=[line.masked for line in ref], b=[line.masked for line in new], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            if not all(line.names_sae for line in ref[i1:i2] + new[j1:j2]):
                removed = "".join(f"\n- {line.masked}" for line in ref[i1:i2])
                added = "".join(f"\n+ {line.masked}" for line in new[j1:j2])
                problems.append(f"lines changed:{removed}{added}")
            continue
        for before, after in zip(ref[i1:i2], new[j1:j2], strict=True):
            for (a, tolerance), (b, _) in zip(before.numbers, after.numbers, strict=True):
                if tolerance is None:
                    continue
                bound = max(a.unit, b.unit) + tolerance.bound(max(abs(a.value), abs(b.value)))
                if abs(a.value - b.value) > bound:
                    problems.append(f"{a.value} -> {b.value} (allowed +-{bound:.3g}) in: {before.masked}")
    return problems

"""PNG plots for asset metadata and the report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gemma_assets.core.files import atomic_file


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_file(path) as staging:
        fig.savefig(staging, dpi=110, bbox_inches="tight")  # legends drawn beside the axes stay whole
    plt.close(fig)
    return path


def norm_histogram(edges: np.ndarray, counts: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    centres = np.sqrt(edges[:-1] * edges[1:])
    used = counts > 0
    ax.bar(centres[used], counts[used], width=np.diff(edges)[used], align="center")
    ax.set_xscale("log")
    ax.set_xlabel("token L2 norm (non-BOS)")
    ax.set_ylabel("tokens")
    return _save(fig, path)


def l0_frontier(rows: list[dict], path: Path, ylabel: str) -> Path:
    """A value against L0 (log scale) with an error bar, one line per series of dictionaries
    (rows carry series, name, l0, value and bar: its (low, high); optionally seed_range, drawn
    as a wide pale bar behind the point, and floor: a baseline, drawn dashed)."""
    fig, ax = plt.subplots(figsize=(11, 5.5))
    names = sorted({row["series"] for row in rows})
    for index, series in enumerate(names):
        members = sorted((row for row in rows if row["series"] == series), key=lambda row: row["l0"])
        points = [(row["l0"], row["value"], row["name"], row["bar"]) for row in members]
        values = np.array([p[1] for p in points])
        bars = np.array([[value - p[3][0], p[3][1] - value] for value, p in zip(values, points, strict=True)])
        # series at the same L0 (every L0 = 1 family) are drawn side by side, so their bars stay apart
        dodge = 2 ** (0.025 * (index - (len(names) - 1) / 2))
        l0s = [p[0] * dodge for p in points]
        marker = "os^Dv"[index // 10 % 5]  # the colour cycle has 10 colours: the 11th series changes marker
        bars = np.clip(np.nan_to_num(bars), 0, None).T  # no interval (one window): no bar
        floor = any(row.get("floor") for row in members)
        drawn = ax.errorbar(
            l0s,
            values,
            yerr=bars,
            marker=marker,
            markersize=4,
            capsize=2,
            linestyle="--" if floor else "-",
            label=f"{series} (floor)" if floor else series,
        )
        for l0, row in zip(l0s, members, strict=True):
            if "seed_range" in row:
                ax.vlines(l0, *row["seed_range"], color=drawn[0].get_color(), linewidth=5, alpha=0.3)
        for l0, (_, value, name, _) in zip(l0s, points, strict=True):
            ax.annotate(name, (l0, value), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: points stay visible
    return _save(fig, path)


def quality_across_k(records: list[dict], path: Path) -> Path:
    """Silhouette (sampled and simplified) and Davies-Bouldin of k-means against k."""
    records = sorted(records, key=lambda r: r["k"])
    ks = [r["k"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.plot(ks, [r["heldout_silhouette_sampled"] for r in records], marker="o", label="silhouette (sampled)")
    left.plot(ks, [r["heldout_simplified_silhouette"] for r in records], marker="o", label="simplified silhouette")
    left.set_ylabel("higher is better")
    left.legend(fontsize=7)
    right.plot(ks, [r["heldout_davies_bouldin"] for r in records], marker="o", color="C3")
    right.set_ylabel("Davies-Bouldin (lower is better)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def alignment_histogram(best_cosines: dict[str, np.ndarray], clustering: str, path: Path, twin_cosine: float) -> Path:
    """Per SAE, the distribution of each centroid's best cosine with the SAE's decoder directions,
    with the cosine that counts as a twin marked."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bins = np.linspace(-0.2, 1, 49)
    for name, values in best_cosines.items():
        ax.hist(values, bins=bins.tolist(), histtype="step", label=name)
    ax.axvline(twin_cosine, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel(f"best cosine of a {clustering} centroid (centred) with an SAE decoder direction")
    ax.set_ylabel("centroids")
    if best_cosines:
        ax.legend(fontsize=6)
    else:  # no SAE configured, or every one skipped (optional, not cached): said on the axes, no empty legend
        ax.set_xlim(bins[0], bins[-1])
        ax.text(0.5, 0.5, "no SAE in this run to align with", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def spectrum(values: np.ndarray, path: Path, xlabel: str, ylabel: str) -> Path:
    """Values sorted in decreasing order on log-log axes: dominant directions show as a cliff."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(np.arange(1, len(values) + 1), np.sort(values)[::-1])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, path)

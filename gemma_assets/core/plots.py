"""PNG plots for asset metadata and the report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def norm_histogram(edges: np.ndarray, counts: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    centres = np.sqrt(edges[:-1] * edges[1:])
    used = counts > 0
    ax.bar(centres[used], counts[used], width=np.diff(edges)[used], align="center")
    ax.set_xscale("log")
    ax.set_xlabel("token L2 norm (non-BOS)")
    ax.set_ylabel("tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def l0_fvu_frontier(rows: list[dict], path: Path) -> Path:
    """FVU against L0 (log scale), one marker style per family of dictionary."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for family in sorted({row["family"] for row in rows}):
        points = sorted((row["l0"], row["fvu"], row["name"]) for row in rows if row["family"] == family)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
        for l0, value, name in points:
            ax.annotate(name, (l0, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L0 (active features per token)")
    ax.set_ylabel("FVU on held-out tokens (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spectrum(values: np.ndarray, path: Path, xlabel: str, ylabel: str) -> Path:
    """Values sorted in decreasing order on log-log axes: dominant directions show as a cliff."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(np.arange(1, len(values) + 1), np.sort(values)[::-1])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Browsable feature pages (static HTML): an index per dictionary and one page per cluster or
latent, with what SAE dashboards show: top examples with context and the token highlighted,
examples from several activation-quantile bins, an activation histogram, token and stratum
distributions, the logit effects of its direction and its best match in the other family."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

from gemma_assets.core.files import atomic_dir
from gemma_assets.core.interpret import EvalTokens

STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:90%}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:90%}
mark{background:#fd8;font-weight:bold}.muted{color:#888}
</style>"""


def _text(decode: Callable[[int], str], token: int) -> str:
    return html.escape(decode(token).replace("\n", "\u23ce").replace("\t", "\u21e5"))


def context_html(tokens: EvalTokens, row: int, decode: Callable[[int], str]) -> str:
    """A token in its window, highlighted, with the context width the EvalTokens carry."""
    ids = tokens.contexts[row]
    centre = len(ids) // 2
    parts = [
        f"<mark>{_text(decode, int(t))}</mark>" if i == centre else _text(decode, int(t))
        for i, t in enumerate(ids)
        if t >= 0
    ]
    return f'<span class="ctx">{"".join(parts)}</span>'


def _histogram_svg(histogram: dict, width: int = 320, height: int = 80) -> str:
    counts = histogram["counts"]
    tallest = max(counts) or 1
    bar = width / len(counts)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - c / tallest * height:.1f}" width="{bar - 1:.1f}" '
        f'height="{c / tallest * height:.1f}" fill="#4a7"/>'
        for i, c in enumerate(counts)
    )
    lo, hi = histogram["edges"][0], histogram["edges"][-1]
    return (
        f'<svg width="{width}" height="{height + 14}">{bars}<text x="0" y="{height + 12}" font-size="10">{lo:.3g}</text>'
        f'<text x="{width - 40}" y="{height + 12}" font-size="10">{hi:.3g}</text></svg>'
    )


def feature_page(
    title: str,
    summary: dict,
    tokens: EvalTokens,
    decode: Callable[[int], str],
    promoted: list[int],
    suppressed: list[int],
    twin: str,
) -> str:
    stats = (
        f"fires on {summary['count']} tokens (density {summary['density']:.4f}); max activation "
        f"{summary.get('max_activation', 0):.4g}, mean {summary.get('mean_activation', 0):.4g}; token entropy "
        f"{summary.get('token_entropy_bits', 0):.2f} bits; stratum purity {summary.get('stratum_purity', 0):.2f}; "
        f"example coherence {summary.get('coherence', 0):.3f}"
    )
    body = [f"<h1>{html.escape(title)}</h1>", '<p><a href="index.html">all features</a></p>', f"<p>{stats}</p>"]
    if summary["count"]:
        body.append("<h2>Top examples</h2><table><tr><th>activation</th><th>context</th></tr>")
        body += [
            f"<tr><td>{value:.4g}</td><td>{context_html(tokens, row, decode)}</td></tr>"
            for row, value in summary["top_examples"]
        ]
        body.append("</table><h2>Examples by activation quantile (strongest bin first)</h2><table>")
        for number, rows in enumerate(summary["quantile_examples"]):
            cells = "<br>".join(context_html(tokens, row, decode) for row in rows)
            body.append(f"<tr><td>bin {number + 1}</td><td>{cells}</td></tr>")
        body.append(f"</table><h2>Activation histogram</h2>{_histogram_svg(summary['histogram'])}")
        body.append("<h2>Tokens</h2><table><tr><th>token</th><th>count</th></tr>")
        body += [f"<tr><td class='ctx'>{_text(decode, t)}</td><td>{c}</td></tr>" for t, c in summary["top_tokens"]]
        body.append("</table><h2>Source strata</h2><table>")
        body += [f"<tr><td>{html.escape(name)}</td><td>{c}</td></tr>" for name, c in summary["strata"].items()]
        body.append("</table>")
    else:
        body.append('<p class="muted">Dead on these tokens: never active.</p>')
    body.append("<h2>Logit effects of the direction</h2>")
    if promoted:
        body.append("<table><tr><th>promoted</th><th>suppressed</th></tr>")
        body += [
            f"<tr><td class='ctx'>{_text(decode, p)}</td><td class='ctx'>{_text(decode, s)}</td></tr>"
            for p, s in zip(promoted, suppressed, strict=True)
        ]
        body.append("</table>")
    else:
        body.append(
            '<p class="muted">Not computed: the feature is not among the evaluation.logit_effect_features '
            "most active of its dictionary.</p>"
        )
    body.append(f"<h2>Best match in the other family</h2><p>{html.escape(twin)}</p>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head><body>{''.join(body)}</body></html>"


def index_page(title: str, summaries: list[dict], twins: list[str], decode: Callable[[int], str]) -> str:
    rows = [
        f"<tr><td><a href='feature-{s['feature']:05d}.html'>{s['feature']}</a></td><td>{s['count']}</td>"
        f"<td>{s.get('token_entropy_bits', 0):.2f}</td><td>{s.get('stratum_purity', 0):.2f}</td>"
        f"<td>{s.get('coherence', 0):.3f}</td><td class='ctx'>"
        + ", ".join(_text(decode, t) for t, _ in s.get("top_tokens", [])[:5])
        + f"</td><td>{html.escape(twin)}</td></tr>"
        for s, twin in zip(summaries, twins, strict=True)
    ]
    header = (
        "<tr><th>feature</th><th>tokens</th><th>token entropy (bits)</th><th>stratum purity</th>"
        "<th>coherence</th><th>top tokens</th><th>best match</th></tr>"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head><body>"
        f"<h1>{html.escape(title)}</h1><p><a href='../index.html'>all dictionaries</a></p>"
        f"<table>{header}{''.join(rows)}</table></body></html>"
    )


def index_page_of_dictionaries(dictionaries: list[tuple[str, str, int]]) -> str:
    rows = "".join(
        f"<tr><td><a href='{html.escape(name)}/index.html'>{html.escape(name)}</a></td><td>{html.escape(family)}</td>"
        f"<td>{n}</td></tr>"
        for name, family, n in dictionaries
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Feature pages</title>{STYLE}</head><body>"
        "<h1>Feature pages</h1><p><a href='../report.html'>report</a></p>"
        f"<table><tr><th>dictionary</th><th>family</th><th>features</th></tr>{rows}</table></body></html>"
    )


def write_site(folder: Path, pages: dict[str, str]) -> None:
    """Write {relative path: html} into `folder` atomically: built beside it, then renamed."""
    with atomic_dir(folder) as staging:
        for relative, text in pages.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")

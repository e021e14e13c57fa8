"""The parts of a report that must not change when code is restructured: everything but the git
revision and the columns that measure this machine's speed."""

from __future__ import annotations

MACHINE_COLUMNS = {"fit_seconds", "fit_peak_rss_mb", "heldout_encode_tokens_per_s"}


def comparable(markdown: str) -> str:
    lines, blanked = [], set()
    for line in markdown.splitlines():
        if line.startswith("Run `") and "git revision" in line:
            continue
        if line.startswith("| ") and not blanked and any(c in line for c in MACHINE_COLUMNS):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            blanked = {i for i, name in enumerate(header) if name in MACHINE_COLUMNS}
        elif line.startswith("| ") and blanked:
            cells = line.strip("|").split("|")
            line = "|" + "|".join(" - " if i in blanked else c for i, c in enumerate(cells)) + "|"
        elif not line.startswith("|"):
            blanked = set()
        lines.append(line)
    return "\n".join(lines) + "\n"

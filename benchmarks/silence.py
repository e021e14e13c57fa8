"""The longest silence of a command's output: does a long run say that it is alive?

    python benchmarks/silence.py --json benchmarks/results/silence_demo_cpu.json -- gemma-assets materialize

Runs the command with stdout and stderr on one pipe (no terminal: the plain-lines mode of
`gemma-assets`, as in a CI log or under nohup), stamps every line with the seconds since the
start, and reports the longest gaps between lines: overall, and while a Dagster step runs
(between a stage's `[i/n] ... ...` line and its `done` line). The target is at most 60 s while
a step runs, with progress lines every 10 s (GEMMA_ASSETS_PROGRESS_EVERY_S). `--log` keeps the
stamped output. Needs only the package.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

STAGE_START = re.compile(r"^\[\d+/\d+\] \S+: .* \.\.\.$")
STAGE_END = re.compile(r"^\[\d+/\d+\] \S+: done in ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--log", type=Path, help="write the stamped output here")
    parser.add_argument("--target-s", type=float, default=60.0)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the command to run after --")
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert process.stdout is not None
    stamped: list[tuple[float, str, bool]] = []  # seconds, line, whether a step was running
    in_step = False
    for raw in process.stdout:
        line = raw.rstrip("\n")
        for part in line.split("\r"):  # a library's own \r progress bar counts as output too
            if part.strip():
                stamped.append((time.monotonic() - started, part, in_step))
        if STAGE_START.match(line):
            in_step = True
        elif STAGE_END.match(line):
            in_step = False
    code = process.wait()
    total = time.monotonic() - started
    gaps = [
        (later - earlier, running, text)
        for (earlier, _, running), (later, text, _) in zip(stamped, stamped[1:], strict=False)
    ]
    overall = max(gaps, default=(0.0, False, ""))
    during = max((gap for gap in gaps if gap[1]), default=(0.0, True, ""))
    result = {
        "command": command,
        "exit_code": code,
        "seconds": total,
        "lines": len(stamped),
        "longest_silence_s": overall[0],
        "longest_silence_before": overall[2],
        "longest_silence_in_a_step_s": during[0],
        "longest_silence_in_a_step_before": during[2],
        "target_s": args.target_s,
        "within_target": during[0] <= args.target_s,
    }
    print(f"{' '.join(command)}: exit {code} after {total / 60:.1f} min, {len(stamped)} lines")
    print("| silence | seconds | ended by |\n|---|---|---|")
    print(f"| longest while a step runs | {during[0]:.1f} | {during[2][:120]} |")
    print(f"| longest overall | {overall[0]:.1f} | {overall[2][:120]} |")
    print(f"target: at most {args.target_s:.0f} s while a step runs: {'met' if result['within_target'] else 'MISSED'}")
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text("".join(f"{at:8.1f}s {text}\n" for at, text, _ in stamped))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()

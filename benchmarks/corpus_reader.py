"""Corpus reader benchmark: the project's line reader against `datasets`' json builder.

    python benchmarks/corpus_reader.py --json benchmarks/results/corpus_reader_cpu.json

Reads the offline Pile-format corpus (jsonl.zst shards built from the Python installation) with
`iter_documents`, which reads local jsonl line by line so that a bad record is named by file and
line, and, as the baseline in the same process, with `datasets.load_dataset("json", ...,
streaming=True)`, the builder it replaced. Both give the same documents (asserted here, and in
test_corpus_errors); the table gives each one's throughput and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_assets.core.corpus import build_offline_corpus, iter_documents  # noqa: E402


def best_of(repeats: int, read) -> tuple[float, list[str]]:
    """The fastest of `repeats` full reads, and the texts read."""
    seconds, texts = float("inf"), []
    for _ in range(repeats):
        started = time.perf_counter()
        texts = read()
        seconds = min(seconds, time.perf_counter() - started)
    return seconds, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    import datasets

    with tempfile.TemporaryDirectory() as folder:
        shards = [str(path) for path in build_offline_corpus(Path(folder, "corpus"))]
        ours, texts = best_of(args.repeats, lambda: [d.text for d in iter_documents(shards)])
        theirs, baseline = best_of(
            args.repeats,
            lambda: [
                r["text"] for r in datasets.load_dataset("json", data_files=shards, split="train", streaming=True)
            ],
        )
    assert texts == baseline, "the readers disagree"
    megabytes = sum(len(text.encode()) for text in texts) / 1e6
    rows = [
        {"reader": "datasets json builder (baseline)", "seconds": theirs, "mb_per_s": megabytes / theirs, "ratio": 1.0},
        {
            "reader": "iter_documents (line reader)",
            "seconds": ours,
            "mb_per_s": megabytes / ours,
            "ratio": theirs / ours,
        },
    ]
    print(f"offline corpus: {len(shards)} shards, {len(texts):,} documents, {megabytes:.1f} MB of text")
    print("| reader | seconds | MB/s | speed vs baseline |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['reader']} | {row['seconds']:.3f} | {row['mb_per_s']:.0f} | {row['ratio']:.1f}x |")
    if args.json:
        result = {"documents": len(texts), "text_mb": megabytes, "rows": rows}
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Loads from the Hugging Face cache when the hub cannot be reached and HF_HUB_OFFLINE is not
set, against the same loads with HF_HUB_OFFLINE=1, each in a fresh process.

    python benchmarks/hub_unreachable.py --json benchmarks/results/hub_unreachable_cpu.json

A random-init tiny Gemma-2 is placed in a temporary Hugging Face cache as google/gemma-2-2b, and
HF_ENDPOINT points at a loopback port that reads each request and closes the connection
unanswered: what a dropped network looks like to the hub client. Each process loads the
tokenizer, the model and the config, then validates and loads one optional Gemma Scope 2 SAE
that the cache lacks (both must say it is unavailable). The two arms alternate, `--repeats`
each; the table gives the median seconds of the loads (imports excluded) and the ratio, and the
requests the unflagged arm sent. Target: at most 1.25x the offline arm, one probe per process
(the hub client alone retries each file with backoff: 140 s for the tokenizer). Needs only the
package.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_assets.core.model import build_tiny_model  # noqa: E402

TARGET_RATIO = 1.25
REVISION = "0" * 40
LOADS = """
import json, time
import torch
from gemma_assets.core import model, sae
from gemma_assets.core.config import load_run_config
from gemma_assets.core.config.schema import ModelSpec

source = "google/gemma-2-2b"
optional = [spec for spec in load_run_config("demo").sae_specs if spec.optional][:1]
started = time.perf_counter()
model.load_tokenizer(source)
model.load_model(source, 1, "cpu", torch.float32)
model.architecture(ModelSpec(kind="hub", name=source, layer=1), None)
skipped = []
assert sae.pretrained_problems(optional, 640, "blocks.6.hook_resid_post", skipped.append) == []
try:
    sae.load_pretrained(optional[0], "cpu")
except sae.SaeUnavailable:
    skipped.append("load")
assert len(skipped) == 2, skipped
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


class DroppingHub:
    """A loopback port that reads each request's first line and closes the connection unanswered."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.requests: list[str] = []
        threading.Thread(target=self._drop, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def close(self) -> None:
        self.listener.close()

    def _drop(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            with connection:
                connection.settimeout(5)
                self.requests.append(connection.recv(4096).decode(errors="replace").split("\r\n")[0])


def cache_with_tiny_model(root: Path) -> Path:
    """A Hugging Face hub cache holding a tiny random Gemma-2 as google/gemma-2-2b."""
    repo = root / "models--google--gemma-2-2b"
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(2000)]
    build_tiny_model(repo / "snapshots" / REVISION, texts)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return root


def load_seconds(cache: Path, endpoint: str, offline: bool) -> float:
    env = {name: value for name, value in os.environ.items() if not name.startswith("HF_")}
    env |= {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": endpoint}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", LOADS], env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cache = cache_with_tiny_model(Path(folder) / "hub")
        hub = DroppingHub()
        arms: dict[str, list[float]] = {"HF_HUB_OFFLINE=1": [], "unset, hub unreachable": []}
        requests_per_process = []
        for _ in range(args.repeats):
            arms["HF_HUB_OFFLINE=1"].append(load_seconds(cache, hub.endpoint, offline=True))
            before = len(hub.requests)
            arms["unset, hub unreachable"].append(load_seconds(cache, hub.endpoint, offline=False))
            requests_per_process.append(hub.requests[before:])
        hub.close()
    medians = {arm: statistics.median(seconds) for arm, seconds in arms.items()}
    ratio = medians["unset, hub unreachable"] / medians["HF_HUB_OFFLINE=1"]
    print("| HF_HUB_OFFLINE | median s | runs (s) |\n|---|---|---|")
    for arm, seconds in arms.items():
        print(f"| {arm} | {medians[arm]:.2f} | {', '.join(f'{s:.2f}' for s in seconds)} |")
    print(
        f"\nratio {ratio:.2f}x (target <= {TARGET_RATIO}x); requests per unflagged process: {requests_per_process[0]}"
    )
    result = {
        "benchmark": "hub_unreachable",
        "loads": "tokenizer, model, config of a cached tiny google/gemma-2-2b; one uncached optional SAE validated "
        "and loaded",
        "seconds": arms,
        "median_seconds": medians,
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "requests_per_unflagged_process": requests_per_process,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

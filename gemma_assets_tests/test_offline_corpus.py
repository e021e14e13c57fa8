"""The offline corpus is built from the Python installation once per folder: a rebuild is
recognised by the sources' sizes and modification times without reading them, and by the
documents' digest when only the times changed; a changed source is rebuilt into it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gemma_assets.core import corpus
from gemma_assets.core.corpus import build_offline_corpus, iter_documents


def _installation(folder: Path) -> Path:
    """A standard library of two modules, a folder the corpus skips, and a license."""
    (folder / "pkg").mkdir(parents=True)
    (folder / "site-packages").mkdir()
    (folder / "alpha.py").write_text('"""Alpha, a module."""\n\n\ndef add():\n    """Adds."""\n')
    (folder / "pkg" / "beta.py").write_text("x = 1\n")
    (folder / "site-packages" / "installed.py").write_text('"""an installed package, not the library"""\n')
    (folder / "LICENSE.txt").write_text("A license.\n\n\nIts second section.")
    return folder


def _state(out: Path) -> tuple[dict, dict[Path, int]]:
    """The manifest, and each shard's modification time (a rewritten shard gets a new one)."""
    shards = sorted((out / "train").glob("*.jsonl.zst"))
    return json.loads((out / "manifest.json").read_text()), {shard: shard.stat().st_mtime_ns for shard in shards}


def test_a_built_corpus_is_reused_without_reading_its_sources_and_rebuilt_when_one_changes(tmp_path, monkeypatch):
    library = _installation(tmp_path / "lib")
    monkeypatch.setattr(corpus, "_stdlib_dir", lambda: library)
    out = tmp_path / "corpus"

    shards = build_offline_corpus(out)
    built, written = _state(out)
    texts = {document.text for document in iter_documents([str(shard) for shard in shards])}
    assert {"x = 1\n", "Alpha, a module.\n\nAdds.", "Its second section."} <= texts
    assert not any("installed package" in text for text in texts)

    assert build_offline_corpus(out) == shards
    assert _state(out) == (built, written)  # nothing rewritten

    touched = (library / "alpha.py").stat()
    os.utime(library / "alpha.py", ns=(touched.st_atime_ns, touched.st_mtime_ns + 10**9))
    assert build_offline_corpus(out) == shards
    manifest, unchanged = _state(out)
    assert unchanged == written and manifest["fingerprint"] == built["fingerprint"]
    assert manifest["installation"] != built["installation"]  # the next call knows it by metadata again

    (library / "pkg" / "beta.py").write_text("x = 2  # a new release\n")
    rebuilt = build_offline_corpus(out)
    texts = {document.text for document in iter_documents([str(shard) for shard in rebuilt])}
    assert "x = 2  # a new release\n" in texts and "x = 1\n" not in texts
    assert _state(out)[0]["fingerprint"] != built["fingerprint"]

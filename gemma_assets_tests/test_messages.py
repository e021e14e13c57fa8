"""Messages name config keys that exist, and an unknown key is answered with the key meant."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gemma_assets.core.config import ConfigError, load_run_config, reference_markdown
from gemma_assets.core.corpus import CorpusError, Document
from gemma_assets.core.model import train_tokenizer
from gemma_assets.core.sampling import sample_windows

PACKAGE = Path(__file__).resolve().parents[1] / "gemma_assets"
SECTIONS = "model|corpus|sampling|clustering|density|leader|quality|evaluation|saes"
# A key is written from its section on; one that continues a longer dotted name (`run.model.layer`,
# `hf_model.model.layers`) is a Python attribute path, not a key.
KEY_MENTION = re.compile(rf"(?<![\w.])(?:{SECTIONS})\.[a-z_]+(?:\.[a-z_]+|\[\]\.[a-z_]+)*")
# Artefact file names that start like a section (`model.npz`, `evaluation.json`), not keys.
FILE_SUFFIXES = {"npz", "json", "safetensors"}
# Attributes of other libraries' objects that read like a key, written without their owner.
NOT_KEYS = {"model.layers"}  # a transformers causal LM's decoder blocks (core/extraction.py)


def config_keys() -> set[str]:
    """Every key path of a run file, as docs/configuration.md names it (`saes.pretrained[].sae_id`)."""
    return set(re.findall(r"^(?:\| |## )`([^`]+)`", reference_markdown(), re.MULTILINE))


def _string_parts(tree: ast.AST) -> Iterator[tuple[ast.expr, str]]:
    """Each string literal with its text; an f-string's constant parts joined, with a NUL for each
    replacement field so no mention is read across one."""
    in_fstring = {
        id(part)
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
        for part in ast.walk(node)
        if part is not node
    }
    for node in ast.walk(tree):
        if id(node) in in_fstring:
            continue
        if isinstance(node, ast.JoinedStr):
            yield node, "".join(part.value if isinstance(part, ast.Constant) else "\0" for part in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node, node.value


def key_mentions(path: Path) -> list[tuple[int, str]]:
    """(line, key) for every config key named in a string literal of a Python file, or anywhere in a
    template."""
    source = path.read_text(encoding="utf-8")
    if path.suffix != ".py":
        lines = enumerate(source.splitlines(), 1)
        return [(number, match[0]) for number, line in lines for match in KEY_MENTION.finditer(line)]
    mentions = []
    for node, text in _string_parts(ast.parse(source)):
        # the literal's source finds the line of a mention in implicitly joined or multi-line strings
        segment = ast.get_source_segment(source, node) or ""
        cursor = 0
        for match in KEY_MENTION.finditer(text):
            found = segment.find(match[0], cursor)
            cursor = max(found + 1, cursor)
            mentions.append((node.lineno + segment.count("\n", 0, max(found, 0)), match[0]))
    return sorted(mentions)


def unknown_key_mentions(package: Path) -> list[str]:
    """`file:line: key` for every key named in the package's sources or templates that the schema lacks."""
    accepted = config_keys() | NOT_KEYS
    files = sorted([*package.rglob("*.py"), *package.rglob("*.j2")])
    return [
        f"{path.relative_to(package.parent)}:{line}: {key}"
        for path in files
        for line, key in key_mentions(path)
        if key not in accepted and key.rpartition(".")[2] not in FILE_SUFFIXES
    ]


def test_messages_name_only_existing_config_keys():
    unknown = unknown_key_mentions(PACKAGE)
    assert not unknown, "these strings name config keys that do not exist (see docs/configuration.md):\n" + "\n".join(
        unknown
    )


def test_scan_reports_file_line_and_key_of_a_wrong_key(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "messages.py").write_text(
        "def fail(n):\n"
        '    """Reads run.model.layer and hf_model.model.layers; writes model.npz."""\n'
        "    raise ValueError(\n"
        '        f"got {n} windows -> raise sampling.document_rate "\n'
        '        "or lower sampling.n_partitions"\n'
        "    )\n"
        'ADVICE = f"set {1}corpus.paths to saes.pretrained[].sae_id or saes.pretrained[].id"\n',
        encoding="utf-8",
    )
    (package / "report.md.j2").write_text("{{ run.model.name }}\nset model.dtypes\n", encoding="utf-8")
    assert unknown_key_mentions(package) == [
        "pkg/messages.py:5: sampling.n_partitions",
        "pkg/messages.py:7: corpus.paths",
        "pkg/messages.py:7: saes.pretrained[].id",
        "pkg/report.md.j2:2: model.dtypes",
    ]


def test_config_keys_cover_nested_and_list_keys():
    keys = config_keys()
    assert {"sampling.windows_per_partition", "corpus.max_documents", "saes.pretrained[].sae_id", "seeds"} <= keys
    assert "sampling.n_partitions" not in keys


def test_too_small_corpus_names_real_keys():
    spec = load_run_config("tiny").sampling
    texts = ["a short text about nothing in particular", "another one, just as short"]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    documents = [Document(doc_id, text, "x") for doc_id, text in enumerate(texts)]
    needs = rf"the run config needs {spec.n_windows} .* -> raise sampling\.document_rate"
    with pytest.raises(CorpusError, match=needs) as error:
        sample_windows(documents, tokenizer, spec)
    named = {match[0] for match in KEY_MENTION.finditer(str(error.value))}
    assert {"sampling.partitions", "sampling.windows_per_partition", "corpus.max_documents"} <= named
    assert named <= config_keys()


@pytest.mark.parametrize(
    ("override", "suggested"),
    [
        ("corpus.paths=x", "corpus.data_files"),  # by meaning: difflib alone offers corpus.dataset
        ("model.block=3", "model.layer"),
        ("clustering.n_clusters=[8]", "clustering.ks"),
        ("corpus.text_fild=body", "corpus.text_field"),  # a plain typo: by spelling
    ],
)
def test_unknown_key_suggests_the_key_meant(override, suggested):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"unknown key '{key}': did you mean '{suggested}'?")):
        load_run_config("tiny", [override])


def test_synonym_of_a_key_another_section_has_is_not_offered():
    with pytest.raises(ConfigError, match=re.escape("unknown key 'model.paths': valid keys of model are")):
        load_run_config("tiny", ["model.paths=x"])

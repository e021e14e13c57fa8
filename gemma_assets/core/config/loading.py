"""Loading a run config: shipped profiles or files, `base:` chains, paths anchored at their
file, `--set` overrides; every problem reported at once (checks.describe), never a traceback.
The resolved config is saved beside a run's outputs and read back from there."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gemma_assets.core.config.checks import describe, static_problems
from gemma_assets.core.config.schema import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG,
    PROFILE_ENV_VAR,
    SHIPPED_CONFIGS,
    ConfigError,
    RunConfig,
)


def shipped_config_path(name: str) -> Path:
    return Path(str(resources.files("gemma_assets") / "configs" / f"{name}.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"run config {path} is not valid YAML{where}: {problem} -> fix the file") from None
    except OSError as error:
        raise ConfigError(f"cannot read run config {path}: {error.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"run config {path} must be a mapping of sections (model:, corpus:, ...), not a {type(data).__name__}"
        )
    return data


def _locate(name_or_path: str, relative_to: Path | None = None) -> Path:
    if name_or_path in SHIPPED_CONFIGS:
        return shipped_config_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.is_file():
        return path.resolve()
    suggestion = difflib.get_close_matches(name_or_path, SHIPPED_CONFIGS, n=1)
    hint = f"did you mean '{suggestion[0]}'? " if suggestion else ""
    raise ConfigError(
        f"unknown run config {name_or_path!r}: no such file, and not a shipped profile. {hint}"
        f"Pass a YAML file or one of {', '.join(SHIPPED_CONFIGS)} (--config, ${CONFIG_ENV_VAR})"
    )


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _anchored(path: Any, folder: Path) -> Any:
    if not isinstance(path, str) or not path or "://" in path:
        return path
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else folder / expanded)


def _anchor_paths(data: dict, folder: Path) -> None:
    """Relative local paths in a file (corpus files, SAE folders) are relative to that file,
    wherever the run starts."""
    corpus = data.get("corpus")
    if isinstance(corpus, dict) and "data_files" in corpus:
        files = corpus["data_files"]
        files = [files] if isinstance(files, str) else files
        if isinstance(files, list):
            corpus["data_files"] = [_anchored(f, folder) for f in files]
    saes = data.get("saes")
    if isinstance(saes, dict) and isinstance(saes.get("pretrained"), list):
        for entry in saes["pretrained"]:
            if isinstance(entry, dict) and "path" in entry:
                entry["path"] = _anchored(entry["path"], folder)


def _file_data(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's keys over those of its `base:` chain."""
    if path in seen:
        raise ConfigError(f"run config {path} names itself as a base (through {', '.join(map(str, seen))})")
    data = _read_yaml(path)
    _anchor_paths(data, path.parent)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"run config {path}: base must be a shipped profile name or a file path, got {base!r}")
    inherited = _file_data(_locate(base, path.parent), (*seen, path))
    inherited.pop("name", None)  # a derived run is a run of its own
    return _merge(inherited, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`key.path=value` with the value read as YAML (`6`, `[64, 512]`, `bfloat16`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r} is not key.path=value: write e.g. --set model.layer=6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict, parts: list[str], value: Any, text: str) -> None:
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"--set {text}: {'.'.join(parts[: depth + 1])} is a value, not a section; set it directly"
            )
        node = child
    node[parts[-1]] = value


def load_run_config(name_or_path: str | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """The run config named (shipped profile or file; default $GEMMA_ASSETS_CONFIG, then
    $GEMMA_ASSETS_PROFILE, then demo) with `key.path=value` overrides, validated."""
    chosen = name_or_path or os.environ.get(CONFIG_ENV_VAR) or os.environ.get(PROFILE_ENV_VAR) or DEFAULT_CONFIG
    path = _locate(chosen)
    data = _file_data(path)
    data.setdefault("name", chosen if chosen in SHIPPED_CONFIGS else path.stem.removesuffix(".yaml"))
    overrides = list(overrides)
    for text in overrides:
        parts, value = parse_override(text)
        _apply_override(data, parts, value, text)
    _anchor_paths(data, Path.cwd())  # what --set left relative is relative to where the command runs
    source = f"run config {chosen}" + (f" (with --set {' '.join(overrides)})" if overrides else "")
    try:
        run = RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(describe(e) for e in error.errors())) from None
    if problems := static_problems(run):
        raise ConfigError(f"{source} is invalid:\n" + "\n".join(f"- {p}" for p in problems))
    return run


def parse_resolved(config_yaml: str) -> RunConfig:
    """A resolved config back from its YAML (assets read it many times per run)."""
    return RunConfig.model_validate(yaml.safe_load(config_yaml))


def save_resolved(run: RunConfig, path: Path) -> Path:
    """The resolved config as YAML, written atomically."""
    from gemma_assets.core.files import write_text

    write_text(path, f"# resolved run config {run.name} (digest {run.digest()})\n" + run.to_yaml())
    return path

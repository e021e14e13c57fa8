"""The registry of dictionary methods: every way the comparison makes dictionaries, each declared
once, in its own module.

A method (k-means, leader clustering, the GMM, SAEs, or one a researcher adds) says which assets
fit it and how the rest of the run reads what they wrote: its records and per-window sums (the
report's tables, frontiers and intervals), its seed replicas, and its members (the splice, the
feature pages, `export` and `verify-report`). The layout, the graph, the evaluation and the
report iterate over `registered()` instead of naming methods, so a new method is one module
that calls `register`.

A method's records carry a `Family` (records.py): the report's row group. One method may have
several (k-means is read as k-means, gain-shape and top-m).

Modules outside the package are named in the run config (`methods: {module: settings}`) and
imported by `methods_of`, so every process that builds the run's graph has them, and a method
registered in one run's process does not join another run.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gemma_assets.core.bootstrap import WindowSums, unflatten
from gemma_assets.core.config import ConfigError
from gemma_assets.core.files import load_arrays
from gemma_assets.core.layout import MissingArtefact
from gemma_assets.core.records import SeedSpread

if TYPE_CHECKING:
    from gemma_assets.core.config import RunConfig
    from gemma_assets.core.dictionaries import Member
    from gemma_assets.core.layout import RunLayout
    from gemma_assets.core.records import DictionaryRecord

Records = Callable[["RunLayout", "RunConfig"], list["DictionaryRecord"]]
Members = Callable[["RunLayout", "RunConfig", str], list["Member"]]


def _none(*_: Any) -> list:
    return []


def _no_replicas(*_: Any) -> dict:
    return {}


@dataclass(frozen=True)
class Method:
    """One method of the comparison. Only `name`, `module`, `build` and, for a method with
    dictionaries, its assets, `records`, `window_files` and `members` are needed; the rest
    default to nothing."""

    name: str
    module: str  # the module that declares it (its settings are `methods.<module>` in the run config)
    # the Dagster builder of its assets: GraphBuild -> asset definitions (defs/; opaque to core)
    build: Callable[[Any], list[Any]]
    # the assets that write its dictionaries (the splice and the interpretation depend on them),
    # and those that write its records and per-window sums (the report depends on them)
    dictionary_assets: tuple[str, ...] = ()
    record_assets: tuple[str, ...] = ()
    # its dictionaries' records on held-out tokens, and the files of their per-window sums
    records: Records = _none
    window_files: Callable[[RunLayout, RunConfig], list[Path]] = _none
    # per seed-0 name, the records of its refits with seeds 1, 2, ...
    seed_records: Callable[[RunLayout, RunConfig], dict[str, list[DictionaryRecord]]] = _no_replicas
    # its dictionaries, loaded on a device: spliced into the model, exported, recomputed
    members: Members = _none
    # those whose features get pages and are aligned with the k-means clusters (default: none)
    interpreted: Members = _none
    # a member's refits with seeds 1, 2, ... (the seed-agreement yardstick)
    replicas: Callable[[RunLayout, RunConfig, Member, str], list[Member]] = _none
    # dictionaries the run names but its assets could not make (an optional pretrained SAE out of
    # reach): name -> why; read from its dictionary or record assets (the report names them)
    skipped: Callable[[RunLayout, RunConfig], dict[str, str]] = _no_replicas
    # the pydantic model of its `methods.<module>` settings in the run config (None: it takes none)
    settings: type | None = None


_registered: dict[str, Method] = {}
PACKAGE = "gemma_assets."  # methods declared inside the package belong to every run


def register(method: Method) -> Method:
    """Add a method (once per name: a module imported twice registers the same method again)."""
    known = _registered.get(method.name)
    if known is not None and known.module != method.module:
        raise ValueError(f"two methods are named {method.name!r} ({known.module}, {method.module}): rename one")
    _registered[method.name] = method
    return method


def registered() -> list[Method]:
    """Every registered method, in registration order."""
    return list(_registered.values())


def methods_of(run: RunConfig) -> list[Method]:
    """The methods of a run, in the order of the report's rows: the package's own, then those
    declared by the modules its `methods` names (imported here, their settings validated)."""
    for module in run.methods:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(
                f"methods: cannot import {module!r} ({error}) -> name an importable module that declares a "
                "method (on PYTHONPATH, or installed), or remove it from the run config"
            ) from None
        if not any(method.module == module for method in _registered.values()):
            raise ConfigError(
                f"methods: module {module!r} declares no method -> call gemma_assets.core.methods.register in it"
            )
    chosen = [m for m in _registered.values() if m.module.startswith(PACKAGE) or m.module in run.methods]
    for method in chosen:
        settings_of(method, run)
    return chosen


def settings_of(method: Method, run: RunConfig) -> Any:
    """The method's settings from the run config's `methods.<module>`, validated by its model."""
    if method.settings is None:
        return None
    try:
        return method.settings(**run.methods.get(method.module, {}))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"methods.{method.module}: {problems} -> fix the settings of method {method.name}") from None


def all_records(layout: RunLayout, run: RunConfig, methods: Sequence[Method]) -> list[DictionaryRecord]:
    """Every dictionary's record, method by method."""
    return [record for method in methods for record in method.records(layout, run)]


def all_seed_spreads(layout: RunLayout, run: RunConfig, methods: Sequence[Method]) -> list[SeedSpread]:
    """Held-out metrics over seeds of every dictionary fitted with more than one seed."""
    replicas = {name: r for method in methods for name, r in method.seed_records(layout, run).items()}
    return [
        SeedSpread.of(record, replicas[record.name])
        for record in all_records(layout, run, methods)
        if replicas.get(record.name)
    ]


def all_skipped(layout: RunLayout, run: RunConfig, methods: Sequence[Method]) -> dict[str, str]:
    """Every dictionary the run names that its method skipped: name -> why."""
    return {name: why for method in methods for name, why in method.skipped(layout, run).items()}


def skipped_line(name: str, reason: str) -> str:
    """The one line that says a dictionary was skipped and why (the log's and the report's)."""
    return f"skipped {name}: {reason}"


def all_window_sums(layout: RunLayout, run: RunConfig, methods: Sequence[Method]) -> dict[str, WindowSums]:
    """Per-window held-out sums of every dictionary, by name (what intervals are computed from)."""
    sums: dict[str, WindowSums] = {}
    for path in (path for method in methods for path in method.window_files(layout, run)):
        if not path.exists():
            raise MissingArtefact(
                f"no per-window sums at {path}: rematerialise the asset that writes {path.parent.name}"
            )
        sums |= unflatten(load_arrays(path))
    return sums


def all_members(layout: RunLayout, run: RunConfig, methods: Sequence[Method], device: str = "cpu") -> list[Member]:
    """Every dictionary of the run, loaded: what the splice, `verify-report` and `export` read."""
    return [member for method in methods for member in method.members(layout, run, device)]


def find_member(layout: RunLayout, run: RunConfig, methods: Sequence[Method], name: str, device: str = "cpu") -> Member:
    """One dictionary of a finished run by its report name (methods are loaded one by one, up to
    the one that has it)."""
    names: list[str] = []
    for method in methods:
        members = method.members(layout, run, device)
        for member in members:
            if member.name == name:
                return member
        names += [member.name for member in members]
    close = difflib.get_close_matches(name, names, n=1)
    raise ConfigError(
        f"run {run.name} has no dictionary {name!r}"
        + (f"; did you mean {close[0]!r}?" if close else "")
        + f" Its dictionaries: {', '.join(names)}"
    )

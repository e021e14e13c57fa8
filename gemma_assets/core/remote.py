"""A run's artefacts on a remote data root (an fsspec URL such as s3://bucket/prefix).

Steps write and read their artefacts in the run's local working copy (RunLayout.root) exactly as
on a local data root. Once an asset's step succeeds, `push` commits the artefacts it claimed
(layout.claims_of); before a step runs, `pull` brings the committed artefacts of the assets it
reads into the working copy, each checked against its commit. On the remote:

    <remote>/artefacts/<asset>/<partitions>/COMMIT.json   per file (its path under the run): size, CRC32
    <remote>/artefacts/<asset>/<partitions>/v-<uuid>/<path under the run>

`<partitions>` is `all` for an unpartitioned asset, else the first and last key of the step
(`16`, `16-64`). As in the activation store (which lives at <remote>/activations and commits
itself), a commit writes every object into a fresh version folder, then COMMIT.json last in one
PUT, then removes the older versions. A crash before COMMIT.json leaves the previous commit
intact and an unreferenced folder that the next commit removes: a reader never sees half an
artefact, and nothing waits on a lock. Where commits of one asset list the same file (a k fitted
again alone after a range of k), the latest commit wins.
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import fsspec

from gemma_assets.core.files import atomic_file
from gemma_assets.core.layout import MissingArtefact, RunLayout
from gemma_assets.core.storage import COMMIT_FILE, StorageError

ARTEFACTS = "artefacts"
UNPARTITIONED = "all"
READ_BLOCK = 16 * 2**20


def crc32_of(path: Path) -> int:
    """The CRC32 of a file, read block by block."""
    crc = 0
    with path.open("rb") as file:
        while block := file.read(READ_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def commit_name(partitions: Sequence[str]) -> str:
    """The folder of a step's commit: `all`, or its first and last partition key."""
    if not partitions:
        return UNPARTITIONED
    return partitions[0] if len(partitions) == 1 else f"{partitions[0]}-{partitions[-1]}"


def _files(claimed: Iterable[Path]) -> Iterator[Path]:
    for path in claimed:
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from (inner for inner in path.rglob("*") if inner.is_file())


def push(layout: RunLayout, owner: str, partitions: Sequence[str], claimed: Iterable[Path]) -> dict:
    """Commit the files under the `claimed` artefact paths of `owner`'s step; returns the commit."""
    fs, base = fsspec.core.url_to_fs(layout.remote)
    folder = f"{base}/{ARTEFACTS}/{owner}/{commit_name(partitions)}"
    version = f"v-{uuid.uuid4().hex}"
    files = {}
    for path in sorted(set(_files(claimed))):
        name = path.relative_to(layout.root).as_posix()
        files[name] = {"size": path.stat().st_size, "crc32": crc32_of(path)}
        fs.put_file(str(path), f"{folder}/{version}/{name}")
    commit = {"version": version, "committed_ns": time.time_ns(), "files": files}
    fs.pipe_file(f"{folder}/{COMMIT_FILE}", json.dumps(commit, indent=1).encode())  # one PUT: atomic
    for stale in fs.ls(folder, detail=False):
        if stale.rstrip("/").rsplit("/", 1)[-1] not in (version, COMMIT_FILE):
            fs.rm(stale, recursive=True)
    return commit


def _rematerialise(owner: str, partitions: str) -> str:
    selection = f"--select {owner}"
    if partitions != UNPARTITIONED:
        first, _, last = partitions.partition("-")
        selection += f" --partition {first}" if not last else f" --partition-range {first}...{last}"
    return (
        f"materialise it again: dagster asset materialize -m gemma_assets.definitions {selection} "
        "(with $GEMMA_ASSETS_CONFIG naming this run's config)"
    )


def _read_commit(fs: fsspec.AbstractFileSystem, path: str, owner: str) -> dict:
    """A COMMIT.json, or StorageError naming it when it is not one (readers index it unchecked)."""
    try:
        commit = json.loads(fs.cat_file(path))
        if isinstance(commit["version"], str) and isinstance(commit["committed_ns"], int):
            if all({"size", "crc32"} <= set(entry) for entry in commit["files"].values()):
                return commit
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not the fields of a commit
        pass
    partitions = path.rsplit("/", 2)[-2]
    raise StorageError(
        f"{fs.unstrip_protocol(path)} is not a commit of {owner} (corrupt) -> {_rematerialise(owner, partitions)}"
    )


def pull(layout: RunLayout, owners: Iterable[str]) -> None:
    """Bring the committed artefacts of `owners` into the working copy (a file already there
    intact is kept). An object its commit lists that is gone or damaged raises MissingArtefact
    or StorageError naming it and the asset to materialise again; an asset never committed
    brings nothing (reading it then fails as on a local data root)."""
    fs, base = fsspec.core.url_to_fs(layout.remote)
    for owner in sorted(owners):
        # one listing per asset: its commits and the size of every object they name (not from the
        # listing cache: another process may have committed or deleted since)
        fs.invalidate_cache(f"{base}/{ARTEFACTS}/{owner}")
        listing = fs.find(f"{base}/{ARTEFACTS}/{owner}", detail=True)
        commits = [
            (path.rsplit("/", 1)[0], _read_commit(fs, path, owner))
            for path in listing
            if path.endswith(f"/{COMMIT_FILE}")
        ]
        latest: dict[str, tuple[str, str, dict]] = {}
        for folder, commit in sorted(commits, key=lambda found: found[1]["committed_ns"]):
            for name, entry in commit["files"].items():
                latest[name] = (folder.rsplit("/", 1)[-1], f"{folder}/{commit['version']}/{name}", entry)
        for name, (partitions, stored, entry) in sorted(latest.items()):
            url = fs.unstrip_protocol(stored)
            if stored not in listing or listing[stored]["size"] != entry["size"]:
                what = "is gone" if stored not in listing else "differs in size from its commit"
                raise MissingArtefact(f"{name} of {owner} {what} ({url}) -> {_rematerialise(owner, partitions)}")
            local = layout.root / name
            if local.is_file() and local.stat().st_size == entry["size"] and crc32_of(local) == entry["crc32"]:
                continue
            with atomic_file(local) as staging:
                fs.get_file(stored, str(staging))
                if crc32_of(staging) != entry["crc32"]:
                    raise StorageError(
                        f"{name} of {owner} fails its CRC32 checksum (corrupt: {url}) -> "
                        f"{_rematerialise(owner, partitions)}"
                    )


def committed_assets(layout: RunLayout) -> list[str]:
    """The assets that have committed artefacts on the run's remote (one listing)."""
    fs, base = fsspec.core.url_to_fs(layout.remote)
    folder = f"{base}/{ARTEFACTS}"
    fs.invalidate_cache(folder)
    if not fs.exists(folder):
        return []
    return sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(folder, detail=False))


def url_problem(url: str) -> tuple[str, str] | None:
    """Why `url` cannot hold outputs and the fix (None: it can): one object written and removed."""
    try:
        fs, base = fsspec.core.url_to_fs(url)
    except ImportError as error:  # no fsspec implementation installed for the protocol
        return str(error), "install the cluster extra: pip install 'gemma_assets[cluster]'"
    probe = f"{base}/.write-test-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except FileNotFoundError as error:
        bucket = fs.unstrip_protocol(base.split("/", 1)[0])
        return str(error), f"create {bucket}, or pass --data-root with a bucket that exists"
    except PermissionError as error:
        return f"access denied: {error}", "use credentials allowed to write there (AWS_PROFILE or AWS_ACCESS_KEY_ID)"
    except Exception as error:  # botocore's credential errors are not OSErrors
        if not type(error).__name__.endswith("CredentialsError"):
            raise
        return (
            str(error),
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); AWS_ENDPOINT_URL for a non-AWS server",
        )
    return None

"""Activation partitions as zarr v3 groups, committed atomically, on a local path or fsspec URL.

Layout under `<root>/activations/part-<key>/`:
    COMMIT.json        pointer to the committed version + per-file CRC32 + shapes
    v-<uuid>/          the zarr group of that version

A partition is written into a fresh `v-<uuid>` folder, checksummed, and only then made
visible by writing COMMIT.json in one atomic step (rename locally, a single PUT on object
storage). A crash leaves an unreferenced folder that the next write of that partition
removes; readers only ever see committed versions. Partitions never share files, so
concurrent writers of different partitions cannot interfere.

bf16 has no zarr dtype: activations are stored as their exact uint16 bit pattern, with
`dtype: bfloat16` in the array attributes. The codec (Blosc: byte shuffle over 1 MiB blocks,
then zstd level 1) was chosen by measurement: see docs/experimental_setup.md.

Writes are parallel: zarr encodes the chunks of one assignment concurrently on its thread pool
(Blosc releases the GIL), and the CRC32 of every file is taken from the bytes as they are
written, so a commit never reads the partition back.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
import zarr
import zarr.storage
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, ZstdCodec

from gemma_assets.core.batches import Batches, WindowBatches
from gemma_assets.core.bf16 import bits_as_bf16, bits_to_float

COMMIT_FILE = "COMMIT.json"
CHUNK_BYTES = 2 * 2**20  # 2 MiB chunks: measured faster to write than 4 MiB, same ratio
ACTIVATIONS = "activations"


class StorageError(RuntimeError):
    """Stored data is missing or corrupt; the message names the partition and the fix."""


def rematerialise_hint(key: str) -> str:
    return (
        f"rematerialise it: dagster asset materialize -m gemma_assets.definitions --select activations "
        f"--partition {key} (with $GEMMA_ASSETS_CONFIG naming this run's config)"
    )


# (version folder, file) pairs whose CRC32 this process has checked: each chunk is verified
# once, before its first use. Version folders are never rewritten, so the pairs stay valid.
_VERIFIED: set[tuple[str, str]] = set()


class VerifiedStore(zarr.storage.WrapperStore):
    """Read-only view of one committed partition version that refuses to hand zarr a file the
    manifest lists unless it exists and matches its CRC32. zarr alone reads a missing chunk as
    the fill value (zeros), silently."""

    def __init__(self, store: Store, key: str = "", version_path: str = "", checksums: dict | None = None):
        super().__init__(store)
        self._key, self._version_path, self._checksums = key, version_path, checksums or {}

    def _with_store(self, store: Store) -> VerifiedStore:
        return VerifiedStore(store, self._key, self._version_path, self._checksums)

    async def get(self, key: str, prototype, byte_range=None):
        expected = self._checksums.get(key)
        if expected is None:
            return await self._store.get(key, prototype, byte_range)
        whole = await self._store.get(key, prototype)
        if whole is None:
            raise StorageError(
                f"activation partition {self._key}: file {key} is missing -> {rematerialise_hint(self._key)}"
            )
        if (self._version_path, key) not in _VERIFIED:
            # off the event loop (zlib releases the GIL), so zarr's concurrent chunk reads stay concurrent
            if await asyncio.to_thread(zlib.crc32, whole.as_numpy_array()) != expected:
                raise StorageError(
                    f"activation partition {self._key}: file {key} fails its CRC32 checksum (corrupt) -> "
                    f"{rematerialise_hint(self._key)}"
                )
            _VERIFIED.add((self._version_path, key))
        if byte_range is None:
            return whole
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


# Blosc's byte shuffle over 1 MiB blocks compresses as well as a whole-chunk shuffle then zstd
# (1.44x on real residual streams), is a codec of the zarr v3 spec, and releases the GIL, so
# zarr's pool encodes chunks in parallel (numcodecs' Shuffle holds it: 2 threads ran slower than 1)
ACTIVATION_CODEC = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=2, blocksize=2**20)
PER_TOKEN_ZSTD_LEVEL = 3
PER_TOKEN_CHUNK_ROWS = 2**16  # token ids, positions, ...: a few hundred KB a chunk, not a hundred tiny files

# zarr's encoding pool and in-flight chunks sized to the machine (its defaults: 4 + cores threads)
zarr.config.set({"threading.max_workers": os.cpu_count() or 1, "async.concurrency": 4 * (os.cpu_count() or 1)})


class ChecksummingStore(zarr.storage.WrapperStore):
    """Records the CRC32 of every file zarr writes through it, keyed like the manifest."""

    def __init__(self, store: Store, checksums: dict[str, int] | None = None):
        super().__init__(store)
        self.checksums: dict[str, int] = {} if checksums is None else checksums

    def _with_store(self, store: Store) -> ChecksummingStore:
        return ChecksummingStore(store, self.checksums)

    async def set(self, key: str, value) -> None:
        # zlib releases the GIL: checksums of concurrent chunk writes run in parallel
        self.checksums[key] = await asyncio.to_thread(zlib.crc32, value.as_numpy_array())
        await self._store.set(key, value)


# what a COMMIT.json holds (PartitionWriter.commit), by field: its type
_MANIFEST_FIELDS = {"version": str, "n_tokens": int, "d_model": int, "checksums": dict, "attrs": dict}


def _manifest_problem(manifest: object) -> str:
    """What makes a parsed COMMIT.json unusable ("" if nothing): readers index it without checks."""
    if not isinstance(manifest, dict):
        return f"holds a JSON {type(manifest).__name__}, not a manifest"
    for name, kind in _MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(name), kind) or isinstance(manifest.get(name), bool):
            return f"has no {kind.__name__} {name!r}"
    version = manifest["version"]
    if not version.startswith("v-") or "/" in version or "\\" in version:
        return f"names version {version!r}, not a version folder of its own"
    if manifest["n_tokens"] < 0 or manifest["d_model"] < 1:
        return f"declares {manifest['n_tokens']} tokens of width {manifest['d_model']}"
    checksums = manifest["checksums"]
    if not all(isinstance(crc, int) and not isinstance(crc, bool) for crc in checksums.values()):
        return "has a checksum that is not a number"
    return ""


@dataclass(frozen=True)
class Partition:
    key: str
    group: zarr.Group
    manifest: dict
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"]

    def zarr_array(self, name: str) -> zarr.Array:
        """The partition's array `name` (KeyError if it holds none of that name), opened once: a
        reader of many batches would otherwise read its metadata file again for each."""
        if name not in self._arrays:
            found = self.group[name]
            if not isinstance(found, zarr.Array):
                raise KeyError(f"partition {self.key}: {name} is a group, not an array")
            self._arrays[name] = found
        return self._arrays[name]

    def activations(self, start: int = 0, stop: int | None = None, as_stored: bool = False) -> torch.Tensor:
        """Rows start:stop as float32, or `as_stored` as bfloat16 (for a caller that converts them
        into memory of its own)."""
        bits = self.array(ACTIVATIONS, start, stop)
        return bits_as_bf16(bits) if as_stored else bits_to_float(bits)

    def array(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return np.asarray(self.zarr_array(name)[start:stop])


def window_ids(key: str, rows: np.ndarray, context_len: int) -> np.ndarray:
    """A window's id, the same in every reader: partition number x 10^6 + its index in the partition."""
    return int(key) * 10**6 + rows // context_len


class PartitionWriter:
    """One partition version being written: activation rows chunk by chunk as they become final
    (so extraction can hand over each batch while it computes the next), then the per-token
    arrays and the commit. Nothing is visible to readers before `commit`; `abort` removes it."""

    def __init__(self, store: ActivationStore, key: str, n_tokens: int, d_model: int) -> None:
        self.store, self.key, self.n_tokens, self.d_model = store, key, n_tokens, d_model
        self.version = f"v-{uuid.uuid4().hex}"
        self.version_path = store._path(f"part-{key}", self.version)
        self._zarr = ChecksummingStore(store._zarr_store(self.version_path, read_only=False))
        self.group = zarr.open_group(self._zarr, mode="w")
        self.chunk_rows = max(1, CHUNK_BYTES // (2 * d_model))
        self._activations = self.group.create_array(
            ACTIVATIONS,
            shape=(n_tokens, d_model),
            chunks=(self.chunk_rows, d_model),
            dtype=np.uint16,
            compressors=ACTIVATION_CODEC,
            # every chunk written: zarr's default compares each chunk with the fill value first, to
            # skip empty ones, which took 40% of a partition's write; activations are never all zero
            config={"write_empty_chunks": True},
        )
        self.rows_written = 0

    def write_rows(self, bits: np.ndarray, stop: int) -> None:
        """Rows [0, stop) of `bits` ([n_tokens, d] uint16, the partition's buffer) are final:
        write the whole chunks among those not yet written (the last chunk once stop = n_tokens)."""
        if bits.shape != (self.n_tokens, self.d_model):
            raise StorageError(
                f"partition {self.key}: activations {bits.shape} differ from the declared "
                f"({self.n_tokens}, {self.d_model})"
            )
        end = stop if stop >= self.n_tokens else stop // self.chunk_rows * self.chunk_rows
        if end > self.rows_written:
            self._activations[self.rows_written : end] = bits[self.rows_written : end]
            self.rows_written = end

    def commit(self, per_token: dict[str, np.ndarray], attrs: dict) -> dict:
        """Write the per-token arrays (row-aligned with the activations), then make this version
        the partition's committed one in one atomic step; returns the manifest."""
        if self.rows_written != self.n_tokens:
            raise StorageError(f"partition {self.key}: {self.rows_written} of {self.n_tokens} rows written")
        if any(len(values) != self.n_tokens for values in per_token.values()):
            raise StorageError(f"partition {self.key}: per-token arrays differ in length from activations")
        for name, values in per_token.items():
            array = self.group.create_array(
                name,
                shape=values.shape,
                chunks=(PER_TOKEN_CHUNK_ROWS,),
                dtype=values.dtype,
                compressors=ZstdCodec(level=PER_TOKEN_ZSTD_LEVEL),
            )
            array[...] = values
        self._activations.attrs["dtype"] = "bfloat16"
        self.group.attrs.update(attrs)
        manifest = {
            "version": self.version,
            "n_tokens": int(self.n_tokens),
            "d_model": int(self.d_model),
            "checksums": self._checksums(),
            "attrs": attrs,
        }
        self.store._commit(self.key, manifest)
        return manifest

    def _checksums(self) -> dict[str, int]:
        """CRC32 of every file of the version: as written, or read back for any file zarr wrote
        by another route than `set`."""
        fs, root = self.store.fs, self.version_path
        files = sorted(path[len(root) + 1 :] for path in fs.find(root))
        recorded = self._zarr.checksums
        return {
            name: recorded[name] if name in recorded else zlib.crc32(fs.cat_file(f"{root}/{name}")) for name in files
        }

    def abort(self) -> None:
        """Remove the uncommitted version (a later write of the partition would remove it too)."""
        if self.store.fs.exists(self.version_path):
            self.store.fs.rm(self.version_path, recursive=True)


class ActivationStore:
    """Committed activation partitions of one profile under a local path or fsspec URL."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)

    def _path(self, *parts: str) -> str:
        return "/".join([self._base, ACTIVATIONS, *parts])

    def _zarr_store(self, path: str, read_only: bool) -> Store:
        if isinstance(self.fs, LocalFileSystem):
            return zarr.storage.LocalStore(path, read_only=read_only)
        # an instance of zarr's own, asynchronous (sync ones such as mem:// wrapped): `self.fs` runs
        # on fsspec's event loop, and an s3fs client used from zarr's loop fails ("attached to a
        # different loop")
        url = self.fs.unstrip_protocol(path)
        return zarr.storage.FsspecStore.from_url(
            url, storage_options=dict(self.fs.storage_options), read_only=read_only
        )

    def writer(self, key: str, n_tokens: int, d_model: int) -> PartitionWriter:
        """A new, invisible version of partition `key`, written row block by row block."""
        return PartitionWriter(self, key, n_tokens, d_model)

    def write_partition(self, key: str, arrays: dict[str, np.ndarray], attrs: dict) -> dict:
        """Write one partition and commit it; returns the commit manifest.

        `arrays` must hold "activations" ([tokens, d] uint16 bf16 bits) and per-token
        arrays of the same length.
        """
        acts = arrays["activations"]
        writer = self.writer(key, *acts.shape)
        writer.write_rows(acts, len(acts))
        return writer.commit({name: values for name, values in arrays.items() if name != ACTIVATIONS}, attrs)

    def _commit(self, key: str, manifest: dict) -> None:
        pointer = self._path(f"part-{key}", COMMIT_FILE)
        payload = json.dumps(manifest, indent=1).encode()
        if isinstance(self.fs, LocalFileSystem):
            staging = f"{pointer}.{uuid.uuid4().hex}.tmp"
            self.fs.pipe_file(staging, payload)
            self.fs.mv(staging, pointer)  # rename: atomic on a local file system
        else:
            self.fs.pipe_file(pointer, payload)  # a single PUT: atomic on object stores
        for stale in self.fs.ls(self._path(f"part-{key}"), detail=False):
            name = stale.rstrip("/").rsplit("/", 1)[-1]
            if name != manifest["version"] and name != COMMIT_FILE:
                self.fs.rm(stale, recursive=True)

    def manifest(self, key: str) -> dict:
        pointer = self._path(f"part-{key}", COMMIT_FILE)
        if not self.fs.exists(pointer):
            raise StorageError(
                f"activation partition {key} is not committed under {self.root} -> materialise "
                f"activations partition {key}"
            )
        try:
            manifest = json.loads(self.fs.cat_file(pointer))
        except ValueError:  # not UTF-8, or not JSON
            problem = "is not valid JSON"
        else:
            if not (problem := _manifest_problem(manifest)):
                return manifest
        raise StorageError(
            f"activation partition {key}: {COMMIT_FILE} {problem} (corrupt) -> {rematerialise_hint(key)}"
        )

    def missing_files(self, key: str, manifest: dict | None = None) -> list[str]:
        """Files the partition's manifest lists that are not on storage (one listing)."""
        manifest = manifest or self.manifest(key)
        version_path = self._path(f"part-{key}", manifest["version"])
        present = (
            {path[len(version_path) + 1 :] for path in self.fs.find(version_path)}
            if self.fs.exists(version_path)
            else set()
        )
        return sorted(set(manifest["checksums"]) - present)

    def committed_keys(self) -> list[str]:
        if not self.fs.exists(self._path()):
            return []
        return sorted(
            name.rstrip("/").rsplit("/", 1)[-1][len("part-") :]
            for name in self.fs.ls(self._path(), detail=False)
            if self.fs.exists(f"{name.rstrip('/')}/{COMMIT_FILE}")
        )

    def open(self, key: str) -> Partition:
        """A committed partition for reading: every file of its manifest present, and each chunk
        checked against its CRC32 when first read (StorageError naming the file otherwise)."""
        manifest = self.manifest(key)
        if missing := self.missing_files(key, manifest):
            listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise StorageError(f"activation partition {key}: file {listed} is missing -> {rematerialise_hint(key)}")
        version_path = self._path(f"part-{key}", manifest["version"])
        store = VerifiedStore(self._zarr_store(version_path, read_only=True), key, version_path, manifest["checksums"])
        return Partition(key, zarr.open_group(store, mode="r"), manifest)

    def verify(self, key: str) -> list[str]:
        """Problems found in a committed partition's files (empty list: intact), each naming the file."""
        manifest = self.manifest(key)
        version_path = self._path(f"part-{key}", manifest["version"])
        missing = self.missing_files(key, manifest)
        problems = [f"chunk file {name} is missing" for name in missing]
        for name, expected in manifest["checksums"].items():
            if name not in missing and zlib.crc32(self.fs.cat_file(f"{version_path}/{name}")) != expected:
                problems.append(f"chunk file {name} fails its CRC32 checksum")
        return problems

    def iter_tokens(
        self,
        keys: list[str],
        batch_tokens: int = 8192,
        exclude_bos: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        as_stored: bool = False,
    ) -> Iterator[tuple[torch.Tensor, dict[str, np.ndarray]]]:
        """Stream (activations [n, d] float32, per-token arrays) in batches of bounded size.

        With exclude_bos, position 0 and any BOS token are dropped: their norm is ~10x
        the others' (massive activations) and would dominate every statistic. `transform`
        (e.g. a whitening Preprocessor's forward) is applied to each batch. With `as_stored` the
        activations are bfloat16, as stored, for a reader that converts them into memory of its
        own (then `transform` sees them as bfloat16).
        """
        for key in keys:
            part = self.open(key)
            bos = part.manifest["attrs"].get("bos_token_id")
            # whole, once: a batch's slice of them would decode their 65,536-row chunks once a batch
            per_token = {name: part.array(name) for name in sorted(part.group.array_keys()) if name != ACTIVATIONS}
            for start in range(0, part.n_tokens, batch_tokens):
                stop = min(start + batch_tokens, part.n_tokens)
                info = {name: values[start:stop].copy() for name, values in per_token.items()}
                info["partition"] = np.full(stop - start, int(key), np.int32)
                info["row"] = np.arange(start, stop)
                acts = part.activations(start, stop, as_stored)
                if exclude_bos:
                    keep = (info["positions"] != 0) & (info["token_ids"] != bos)
                    acts = acts[torch.from_numpy(keep)]
                    info = {name: values[keep] for name, values in info.items()}
                yield (acts if transform is None else transform(acts)), info

    def token_count(self, keys: list[str]) -> int:
        """Tokens stored in `keys`, BOS included (from the commit manifests: no array is read),
        so an upper bound on what `batches` yields."""
        return sum(self.manifest(key)["n_tokens"] for key in keys)

    def batches(self, keys: list[str], transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Batches:
        """The non-BOS activations of `keys` as a re-iterable stream (one pass per call)."""
        return lambda: (x for x, _ in self.iter_tokens(keys, transform=transform))

    def window_batches(self, keys: list[str]) -> WindowBatches:
        """Like `batches`, each batch with the window id of its tokens (see `window_ids`)."""

        def batches() -> Iterator[tuple[torch.Tensor, np.ndarray]]:
            for key in keys:
                context_len = self.manifest(key)["attrs"]["context_len"]
                for x, info in self.iter_tokens([key]):
                    yield x, window_ids(key, info["row"], context_len)

        return batches

    def load_tokens(
        self,
        keys: list[str],
        exclude_bos: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """All tokens of `keys` in memory (for data that fits; streaming callers use iter_tokens)."""
        batches = list(self.iter_tokens(keys, exclude_bos=exclude_bos, transform=transform))
        if not batches:
            raise StorageError(f"no tokens in partitions {keys}")
        acts = torch.cat([b[0] for b in batches])
        info = {name: np.concatenate([b[1][name] for b in batches]) for name in batches[0][1]}
        return acts, info

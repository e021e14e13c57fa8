"""The one place this project reaches into SAELens privately: Gemma Scope 2 SAEs loaded offline.

SAELens' Gemma 3 loader (`conversion_func: gemma_3`, the Gemma Scope 2 releases) reads the
weights' shapes with `get_safetensors_tensor_shapes`, which sends raw HTTP range requests to the
hub: it fails with HF_HUB_OFFLINE=1 even when the file is in the Hugging Face cache.
`hub_cache_shapes` swaps it, for the duration of a load or a validation, for a reader of the
safetensors header of the cached file, which falls back to SAELens' own reader online.
test_pretrained_optional fails, naming the function, when a SAELens release renames or removes it.
"""

from __future__ import annotations

import functools
import json
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOADERS_MODULE = "sae_lens.loading.pretrained_sae_loaders"
SHAPES_FUNCTION = "get_safetensors_tensor_shapes"

_swapping = threading.Lock()  # a module attribute is swapped: one load at a time


def safetensors_shapes(path: str) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header alone (8-byte length, then JSON)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}


def cached_tensor_shapes(
    repo_id: str, filename: str, read_remote: Callable[[str, str], dict[str, list[int]]]
) -> dict[str, list[int]]:
    """SAELens' `get_safetensors_tensor_shapes` that reads the Hugging Face cache first. Not
    cached: offline, the hub client's own LocalEntryNotFoundError; online, `read_remote` (SAELens'
    range requests: a validation reads the header, not a 1.3 GB file)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return safetensors_shapes(cached)
    if constants.is_offline_mode():
        hf_hub_download(repo_id, filename)  # raises the client's error that says the cache lacks it
    return read_remote(repo_id, filename)


@contextmanager
def hub_cache_shapes() -> Iterator[None]:
    """SAELens' loaders read safetensors shapes through the Hugging Face cache inside the block."""
    import importlib

    loaders = importlib.import_module(LOADERS_MODULE)
    if not hasattr(loaders, SHAPES_FUNCTION):
        raise RuntimeError(
            f"this SAELens has no {LOADERS_MODULE}.{SHAPES_FUNCTION} -> adapt gemma_assets/core/sae_lens_offline.py "
            "to how it now reads safetensors shapes"
        )
    with _swapping:
        original = getattr(loaders, SHAPES_FUNCTION)
        setattr(loaders, SHAPES_FUNCTION, functools.partial(cached_tensor_shapes, read_remote=original))
        try:
            yield
        finally:
            setattr(loaders, SHAPES_FUNCTION, original)

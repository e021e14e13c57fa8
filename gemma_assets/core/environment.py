"""The numeric environment a result was computed in: what decides its float rounding.

The same code on the same stored activations gives bit-identical numbers only under the same
kernels: PyTorch picks its CPU kernels by the vector width the CPU offers (AVX-512, AVX2 or the
portable `default`, overridable with ATEN_CPU_CAPABILITY), the BLAS splits sums by its thread
count, and a GPU has kernels of its own. A report names all of it, so that a reader who reruns it
elsewhere knows which tolerance their numbers are to be held to (docs/reproducibility.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch

_TORCH_BLAS = re.compile(r"BLAS_INFO=(\w+)")


def _torch_blas() -> str:
    found = _TORCH_BLAS.search(torch.__config__.show())
    return found.group(1) if found else "unknown"


def _numpy_blas() -> str:
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool["user_api"] == "blas":
            architecture = f" ({pool['architecture']})" if pool.get("architecture") else ""
            return f"{pool['internal_api']} {pool['version']}{architecture}"
    return "unknown"


def _accelerator(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}, CUDA {torch.version.cuda})"


def numeric_environment(device: str, forward_dtype: torch.dtype, comoment_precision: str) -> dict[str, str | int]:
    """What decided this process's float rounding: library versions, the CPU kernels' vector
    width, the BLAS libraries, threads, the GPU if `device` is one, and the dtype policy."""
    environment: dict[str, str | int] = {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": device,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_blas": _torch_blas(),
        "numpy_blas": _numpy_blas(),
        "torch_threads": torch.get_num_threads(),
    }
    accelerator = _accelerator(device)
    if accelerator:
        environment["gpu"] = accelerator
    environment["forward_dtype"] = str(forward_dtype).removeprefix("torch.")
    environment["dtype_policy"] = (
        "activations stored as bfloat16, dictionaries float32, metrics and CE sums float64, "
        f"co-moment {comoment_precision}"
    )
    return environment


def describe(environment: Mapping[str, str | int]) -> str:
    """One line for a report: `key value` pairs in the order recorded."""
    return "; ".join(f"{key.replace('_', ' ')} {value}" for key, value in environment.items())

"""Exact bf16 <-> uint16 bit patterns (bf16 has no numpy or zarr dtype)."""

from __future__ import annotations

import numpy as np
import torch


def bf16_to_bits(tensor: torch.Tensor) -> np.ndarray:
    """The exact bit pattern of a tensor cast to bf16, as uint16."""
    return tensor.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def bits_to_float(bits: np.ndarray) -> torch.Tensor:
    """bf16 bit patterns back to a float32 tensor (exact: bf16 is a prefix of float32)."""
    return bits_as_bf16(bits).float()


def bits_as_bf16(bits: np.ndarray) -> torch.Tensor:
    """bf16 bit patterns as a bfloat16 tensor over the same memory."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)

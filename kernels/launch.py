"""What every launcher of :mod:`mesimp_gpu.kernels` shares: the device guard and the output buffers.

Triton launches on torch's *current* CUDA device and stream, not on the device of the tensors it is
given: a launch on ``cuda:1`` tensors while ``cuda:0`` is current would run on device 0 and read
another device's memory. Every launcher therefore enters :func:`on_device` of its first tensor
around its launches (launchers call it through this module, so a test can watch it).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def on_device(t: Tensor) -> contextlib.AbstractContextManager[object]:
    """A context making ``t``'s CUDA device the current one (nothing to do for CPU tensors, the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def output_buffer(
    out: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str
) -> Tensor:
    """``out`` after checking it, or a fresh uninitialised tensor (launchers' kernels write every element)."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} {list(shape)} tensor on {device}")
    return out

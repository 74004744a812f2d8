"""The CuPy backend: a CUDA fallback for machines where Triton is unavailable.

Tensors cross to CuPy through DLPack without copies (bfloat16 ones as their ``int16`` bits: CuPy has
no bfloat16), on the tensors' device and torch's current stream there (:func:`_on`), so in-place
updates (``dw``) land in the torch tensors in order. The array logic lives in
:mod:`mesimp_gpu.backends.cupy_logic` (tested with NumPy in CI):

- selection: the magnitude bits of ``g`` (int64 for float64, int32 otherwise), the k-th largest bit
  pattern per row from the radix-select RawKernels ``KTH_LARGEST_SOURCE``, then the torch backend's
  tie-fill (:func:`~mesimp_gpu.backends.torch_backend.threshold_indices`) on the same integers: exact
  for every dtype, exactly ``k`` per row;
- ``dx`` and ``dW``: GEMMs on the kept entries compacted onto the touched columns (cuBLAS via CuPy),
  in float32 for half-precision tensors;
- unified meProp: CuPy column scores and the selection above, then the shared GEMMs of the base class.

The lazy optimizers' row updates are the portable torch ops of the base class.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from mesimp_gpu.backends import BackendUnavailable
from mesimp_gpu.backends import cupy_logic as logic
from mesimp_gpu.backends.base import Backend, check_finite, check_k
from mesimp_gpu.backends.torch_backend import threshold_indices

try:
    import cupy
except ImportError as exc:
    raise BackendUnavailable(f"backend 'cupy' needs the cupy package (pip install mesimp-gpu[cuda]): {exc}") from exc

#: threads per block of the selection kernel (a multiple of the warp size)
KTH_THREADS = 256


@functools.cache
def _kth_kernel(width: int) -> Any:
    """The RawKernel for ``width``-bit patterns (CuPy loads it on each device it is launched on)."""
    return cupy.RawKernel(logic.KTH_LARGEST_SOURCE, logic.KTH_KERNELS[width])


@contextlib.contextmanager
def _on(t: Tensor) -> Iterator[None]:
    """Run CuPy work on ``t``'s device and on torch's current stream of that device, so both libraries
    see each other's writes in order (CuPy's own current device may be another one)."""
    with cupy.cuda.Device(t.device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(t.device).cuda_stream):
        yield


def _cp(t: Tensor) -> Any:
    """``t`` as a CuPy array sharing its memory; a bfloat16 tensor as its bits (``uint16``, see cupy_logic)."""
    if t.device.type != "cuda":
        raise ValueError(f"backend 'cupy' needs CUDA tensors, got one on {t.device}")
    if t.dtype == torch.bfloat16:
        return cupy.from_dlpack(t.detach().view(torch.int16)).view(cupy.uint16)
    return cupy.from_dlpack(t.detach())


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype the products are accumulated in for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kth_largest(bits: Any, k: int) -> Any:
    """``[B]``: the k-th largest of each row of ``bits`` (``[B, n]`` int32/int64 CuPy array), by the RawKernel."""
    kth = cupy.empty(bits.shape[0], dtype=bits.dtype)
    if bits.shape[0]:
        _kth_kernel(logic.bit_width(bits))(
            (bits.shape[0],), (KTH_THREADS,), (bits, kth, cupy.int64(bits.shape[1]), cupy.int32(k))
        )
    return kth


def select(g: Tensor, k: int) -> Tensor:
    """``[B, k]`` int64 ascending: the selection rule on ``g`` (``[B, n]``, finite, ``1 <= k <= n``)."""
    g = g.contiguous()
    with _on(g):
        bits = logic.magnitude_bits(cupy, _cp(g))  # (B, n) int32, int64 for float64
        kth = _kth_largest(bits, k)  # (B,)
        bits_t, kth_t = torch.from_dlpack(bits), torch.from_dlpack(kth)
    return threshold_indices(bits_t, kth_t.unsqueeze(1), k)


def meprop_dx(vals: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """``dx = G_k @ weight`` (``[B, in]``, float32 or float64) from ``vals``/``idx`` ``[B, k]`` and ``weight``
    ``[out, in]``."""
    with _on(weight):
        return torch.from_dlpack(logic.sparse_dx(cupy, _cp(vals), _cp(idx), _cp(weight.contiguous())))


def meprop_dw(vals: Tensor, idx: Tensor, x: Tensor, out_features: int) -> Tensor:
    """``dW = G_k^T x`` (``[out, in]``, float32 or float64) from ``vals``/``idx`` ``[B, k]``, non-zero on
    touched rows."""
    dw = torch.zeros(out_features, x.shape[1], dtype=_wide(vals.dtype), device=x.device)
    with _on(x):
        logic.accumulate_dw(cupy, _cp(vals), _cp(idx), _cp(x.contiguous()), _cp(dw))
    return dw


class CupyBackend(Backend):
    """CuPy launchers behind the :class:`Backend` contract (CUDA tensors only)."""

    name = "cupy"

    def __init__(self) -> None:
        try:
            devices = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise BackendUnavailable(f"backend 'cupy' found no usable CUDA runtime: {exc}") from exc
        if devices == 0 or not torch.cuda.is_available():
            raise BackendUnavailable("backend 'cupy' needs a CUDA device visible to both CuPy and torch (none found)")

    def topk_indices(self, g: Tensor, k: int) -> Tensor:
        check_finite(g)
        return select(g, check_k(k, g.shape[1]))

    def sparse_backward(
        self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        vals = g.gather(1, idx)  # (B, k)
        dx = meprop_dx(vals, idx, weight).to(x.dtype) if need_dx else None
        return dx, meprop_dw(vals, idx, x, weight.shape[0]).to(weight.dtype)

    def column_scores(self, g: Tensor) -> Tensor:
        with _on(g):
            return torch.from_dlpack(logic.column_scores(cupy, _cp(g.contiguous())))

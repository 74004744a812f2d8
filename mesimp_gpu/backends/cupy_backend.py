"""The CuPy backend: a CUDA fallback for machines where Triton is unavailable.

Tensors cross to CuPy through DLPack without copies, on torch's current stream, so in-place updates
(``dw``) land in the torch tensors. The array logic lives in :mod:`mesimp_gpu.backends.cupy_logic`
(tested with NumPy in CI):

- selection: the k-th largest magnitude per row from the radix-select RawKernel
  ``KTH_LARGEST_SOURCE``, then the torch backend's tie-fill
  (:func:`~mesimp_gpu.backends.torch_backend.threshold_indices`) on torch tensors;
- ``dx`` and ``dW``: GEMMs on the kept entries compacted onto the touched columns (cuBLAS via CuPy);
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
def _kth_kernel() -> Any:
    return cupy.RawKernel(logic.KTH_LARGEST_SOURCE, "kth_largest_abs")


@contextlib.contextmanager
def _torch_stream() -> Iterator[None]:
    """Run CuPy work on torch's current CUDA stream, so both libraries see each other's writes in order."""
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        yield


def _cp(t: Tensor) -> Any:
    if t.device.type != "cuda":
        raise ValueError(f"backend 'cupy' needs CUDA tensors, got one on {t.device}")
    return cupy.from_dlpack(t.detach())


def kth_largest_abs(a: Tensor, k: int) -> Tensor:
    """``[B, 1]`` float32: the ``k``-th largest entry per row of ``a = |g|`` (``[B, n]`` float32, contiguous)."""
    kth = torch.empty(a.shape[0], 1, dtype=torch.float32, device=a.device)
    if a.shape[0]:
        with _torch_stream():
            _kth_kernel()((a.shape[0],), (KTH_THREADS,), (_cp(a), _cp(kth), cupy.int64(a.shape[1]), cupy.int32(k)))
    return kth


def meprop_dx(vals: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """``dx = G_k @ weight`` (``[B, in]``) from ``vals``/``idx`` ``[B, k]`` and ``weight`` ``[out, in]``."""
    with _torch_stream():
        return torch.from_dlpack(logic.sparse_dx(cupy, _cp(vals), _cp(idx), _cp(weight)))


def meprop_dw(vals: Tensor, idx: Tensor, x: Tensor, out_features: int) -> Tensor:
    """``dW = G_k^T x`` (``[out, in]``, ``x``'s dtype) from ``vals``/``idx`` ``[B, k]``, non-zero on touched rows."""
    dw = torch.zeros(out_features, x.shape[1], dtype=x.dtype, device=x.device)
    with _torch_stream():
        logic.accumulate_dw(cupy, _cp(vals), _cp(idx), _cp(x), _cp(dw))
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
        k = check_k(k, g.shape[1])
        # (B, n): the float32 magnitudes the kernel ranks by their bits; the tie-fill compares the same
        # values, so a float64 gradient is ranked at float32 precision with exactly k kept per row
        a = g.float().abs().contiguous()
        return threshold_indices(a, kth_largest_abs(a, k), k)

    def sparse_backward(
        self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        vals = g.gather(1, idx)  # (B, k)
        dx = meprop_dx(vals, idx, weight).to(x.dtype) if need_dx else None
        return dx, meprop_dw(vals, idx, x, weight.shape[0]).to(weight.dtype)

    def column_scores(self, g: Tensor) -> Tensor:
        with _torch_stream():
            return torch.from_dlpack(logic.column_scores(cupy, _cp(g)))

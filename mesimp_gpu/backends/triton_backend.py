"""The Triton backend: the kernels of :mod:`mesimp_gpu.kernels` behind the :class:`Backend` contract.

- ``topk_indices``: radix (threshold) selection, one program per row (:mod:`mesimp_gpu.kernels.topk`).
- ``topk_backward``: selection, hit counts and ``dx = G_k W`` in one kernel (or selection + gather
  kernel for small batches), then the row-partitioned ``dW = G_k^T x`` (:mod:`mesimp_gpu.kernels.rows`).
- ``sparse_backward`` (given indices, e.g. random-k): gather kernel for ``dx``, row kernel for ``dW``.
- ``unified_backward``: Triton column scores and selection, cuBLAS GEMMs (:mod:`mesimp_gpu.kernels.unified`).

Everything is deterministic: no float atomics anywhere (hits use integer atomics).
Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter; slow).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mesimp_gpu.backends import BackendUnavailable
from mesimp_gpu.backends.base import Backend, check_finite, check_k

try:
    import triton

    from mesimp_gpu.kernels.gather import meprop_dx
    from mesimp_gpu.kernels.rows import meprop_dw
    from mesimp_gpu.kernels.topk import topk_dx, topk_select
    from mesimp_gpu.kernels.unified import unified_backward
except ImportError as exc:  # triton missing or broken
    raise BackendUnavailable(f"backend 'triton' needs the triton package: {exc}") from exc


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read as Triton reads it)."""
    return bool(triton.knobs.runtime.interpret)


class TritonBackend(Backend):
    """Triton kernels for every launcher of the contract; see the module docstring."""

    name = "triton"

    def __init__(self) -> None:
        if not torch.cuda.is_available() and not interpreting():
            raise BackendUnavailable(
                "backend 'triton' needs a CUDA device (none found); set TRITON_INTERPRET=1 to run its kernels "
                "on CPU tensors in Triton's (slow) interpreter"
            )

    @staticmethod
    def _check_device(*tensors: Tensor) -> None:
        for t in tensors:
            if t.device.type != "cuda" and not interpreting():
                raise ValueError(f"backend 'triton' needs CUDA tensors (got {t.device}) unless TRITON_INTERPRET=1")

    def topk_indices(self, g: Tensor, k: int) -> Tensor:
        self._check_device(g)
        check_finite(g)
        return topk_select(g, check_k(k, g.shape[1]))[1]

    def sparse_backward(self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        self._check_device(g, x, weight)
        vals = g.gather(1, idx)  # (B, k)
        dx = meprop_dx(vals, idx, weight)
        dw = meprop_dw(vals, idx, x, weight.shape[0])
        return dx.to(x.dtype), dw.to(weight.dtype)

    def topk_backward(
        self, g: Tensor, x: Tensor, weight: Tensor, k: int, hits: Tensor | None = None, need_dx: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        # dx comes out of the selection kernel itself, so need_dx=False saves nothing here
        self._check_device(g, x, weight)
        check_finite(g)
        vals, idx, dx = topk_dx(g, check_k(k, g.shape[1]), weight, hits)
        dw = meprop_dw(vals, idx, x, weight.shape[0])
        return dx.to(x.dtype), dw.to(weight.dtype), idx

    def unified_backward(self, g: Tensor, x: Tensor, weight: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        self._check_device(g, x, weight)
        check_finite(g)
        return unified_backward(g, x, weight, check_k(k, g.shape[1]))

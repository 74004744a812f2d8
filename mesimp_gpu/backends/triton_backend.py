"""The Triton backend: the kernels of :mod:`mesimp_gpu.kernels` behind the :class:`Backend` contract.

- ``topk_indices``: radix (threshold) selection, one program per row (:mod:`mesimp_gpu.kernels.topk`).
- ``topk_backward``: selection, hit counts and ``dx = G_k W`` in one kernel (or selection + gather
  kernel for small batches; the selection alone without ``need_dx``), then the row-partitioned
  ``dW = G_k^T x`` (:mod:`mesimp_gpu.kernels.rows`).
- ``sparse_backward`` (given indices, e.g. random-k): gather kernel for ``dx``, row kernel for ``dW``.
- ``unified_backward``: Triton column scores (:mod:`mesimp_gpu.kernels.unified`) and selection, then
  the shared cuBLAS GEMMs of the base class.
- the lazy optimizers' row updates: SGD, Adam and AdaGrad kernels on the touched rows
  (:mod:`mesimp_gpu.kernels.row_updates`) for float32/float16/bfloat16 parameters; float64 ones take
  the portable torch ops.

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

    from mesimp_gpu.kernels import row_updates
    from mesimp_gpu.kernels.gather import meprop_dx
    from mesimp_gpu.kernels.rows import meprop_dw
    from mesimp_gpu.kernels.topk import topk_dx, topk_select
    from mesimp_gpu.kernels.unified import column_scores
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

    @staticmethod
    def _rows_native(p: Tensor, grad: Tensor, *state: Tensor | None) -> bool:
        """True when the row-update kernels take ``p``: a contiguous float32/16/bf16 tensor where Triton
        runs, with gradient and state of its shape and dtype, contiguous, on its device."""
        return (
            p.dim() >= 1
            and p.dtype in row_updates.DTYPES
            and (p.device.type == "cuda" or interpreting())
            and all(
                t.shape == p.shape and t.dtype == p.dtype and t.device == p.device and t.is_contiguous()
                for t in (p, grad, *(s for s in state if s is not None))
            )
        )

    def topk_indices(self, g: Tensor, k: int) -> Tensor:
        self._check_device(g)
        check_finite(g)
        return topk_select(g, check_k(k, g.shape[1]))[1]

    def sparse_backward(
        self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        self._check_device(g, x, weight)
        vals = g.gather(1, idx)  # (B, k)
        dx = meprop_dx(vals, idx, weight).to(x.dtype) if need_dx else None
        dw = meprop_dw(vals, idx, x, weight.shape[0])
        return dx, dw.to(weight.dtype)

    def topk_backward(
        self, g: Tensor, x: Tensor, weight: Tensor, k: int, hits: Tensor | None = None, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        self._check_device(g, x, weight)
        check_finite(g)
        k = check_k(k, g.shape[1])
        if need_dx:
            vals, idx, dx = topk_dx(g, k, weight, hits)
        else:
            (vals, idx), dx = topk_select(g, k, hits), None
        dw = meprop_dw(vals, idx, x, weight.shape[0])
        return (dx.to(x.dtype) if dx is not None else None), dw.to(weight.dtype), idx

    def column_scores(self, g: Tensor) -> Tensor:
        self._check_device(g)
        return column_scores(g)

    def sgd_rows_(
        self,
        p: Tensor,
        grad: Tensor,
        rows: Tensor | None,
        lr: float,
        clip: float | None = None,
        momentum: float = 0.0,
        momentum_buffer: Tensor | None = None,
    ) -> None:
        if not self._rows_native(p, grad, momentum_buffer):
            return super().sgd_rows_(p, grad, rows, lr, clip, momentum, momentum_buffer)
        row_updates.sgd_rows_(p, grad, rows, lr, clip, momentum, momentum_buffer)

    def adam_rows_(
        self,
        p: Tensor,
        grad: Tensor,
        rows: Tensor | None,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        step: float,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        clip: float | None = None,
    ) -> None:
        if not self._rows_native(p, grad, exp_avg, exp_avg_sq):
            return super().adam_rows_(p, grad, rows, exp_avg, exp_avg_sq, step, lr, betas, eps, clip)
        row_updates.adam_rows_(p, grad, rows, exp_avg, exp_avg_sq, step, lr, betas, eps, clip)

    def adagrad_rows_(
        self,
        p: Tensor,
        grad: Tensor,
        rows: Tensor | None,
        state_sum: Tensor,
        lr: float,
        eps: float,
        clip: float | None = None,
    ) -> None:
        if not self._rows_native(p, grad, state_sum):
            return super().adagrad_rows_(p, grad, rows, state_sum, lr, eps, clip)
        row_updates.adagrad_rows_(p, grad, rows, state_sum, lr, eps, clip)

"""The Triton backend: the kernels of :mod:`mesimp_gpu.kernels` behind the :class:`Backend` contract.

- ``topk_indices``: radix (threshold) selection, one program per row, or per chunk then per row for
  wide rows (:mod:`mesimp_gpu.kernels.topk`).
- ``topk_backward``: selection and hit counts, then ``dx = G_k W`` by the gather kernel (fused into
  the selection where :func:`~mesimp_gpu.kernels.topk.fuse_wins`; skipped without ``need_dx``), then
  the row-partitioned, write-only ``dW = G_k^T x`` (:mod:`mesimp_gpu.kernels.rows`).
- ``sparse_backward`` (given indices, e.g. random-k): gather kernel for ``dx``, row kernel for ``dW``.
- ``unified_backward``: Triton column scores (:mod:`mesimp_gpu.kernels.unified`) and selection, then
  the shared cuBLAS GEMMs of the base class.
- the lazy optimizers' row updates: SGD, Adam and AdaGrad kernels on the touched rows
  (:mod:`mesimp_gpu.kernels.row_updates`) for float32/float16/bfloat16 parameters; float64 ones take
  the portable torch ops.

Everything is deterministic: no float atomics anywhere (hits use integer atomics).
Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter; slow).

Non-finite gradients, without a host synchronisation in the backward: the selection kernel sets a
per-device flag when a row it ranks holds NaN or inf (and still writes valid indices). After its
launches, a call queues a copy of the flag into pinned host memory and records an event; every call
then raises :class:`~mesimp_gpu.backends.base.InvalidGradientError` once a copy that has *arrived*
shows the flag (``event.query()``: it never waits). On CPU tensors the copy arrives at once, so the
call that saw the NaN raises; on CUDA it is normally the next call (the next layer's backward, or the
next step's, as the training loop reads its loss in between). :meth:`TritonBackend.raise_if_non_finite`
waits for the copy, for callers that must know now.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mesimp_gpu.backends import BackendUnavailable
from mesimp_gpu.backends.base import Backend, InvalidGradientError, check_k

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


class NonFiniteFlag:
    """One device's sticky "a ranked gradient held NaN or inf" flag and its asynchronous host copy.

    ``flag`` (``[1]`` int32 on the device) is what the kernels set; :meth:`publish` queues its copy to
    ``host`` (pinned memory on CUDA) behind the launches that may set it; :meth:`raise_if_set` reads
    the copy once it has arrived (or waits for it with ``wait``) and raises, clearing both.
    """

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.host = torch.zeros(1, dtype=torch.int32, pin_memory=cuda)
        #: recorded after each copy on CUDA; None on CPU, where the copy is synchronous
        self.event: torch.cuda.Event | None = torch.cuda.Event() if cuda else None
        self.published = False

    def publish(self) -> None:
        """Queue the copy of the flag to the host behind the work launched so far (no waiting)."""
        self.host.copy_(self.flag, non_blocking=self.event is not None)
        if self.event is not None:
            cuda = self.flag.device.type == "cuda"
            self.event.record(torch.cuda.current_stream(self.flag.device) if cuda else None)
        self.published = True

    def raise_if_set(self, wait: bool = False) -> None:
        """Raise :class:`InvalidGradientError` if an arrived copy shows the flag (``wait``: wait for the last copy)."""
        if not self.published:
            return
        if self.event is not None:
            if wait:
                self.event.synchronize()
            elif not self.event.query():
                return  # still in flight: a later call reads it
        if int(self.host[0]):
            self.flag.zero_()
            self.host.zero_()
            self.published = False
            raise InvalidGradientError(
                "meProp received a non-finite output gradient (NaN or inf) in a backward pass; top-k selection "
                "is undefined. Lower the learning rate, enable gradient clipping, or check the loss for overflow."
            )


class TritonBackend(Backend):
    """Triton kernels for every launcher of the contract; see the module docstring."""

    name = "triton"

    def __init__(self) -> None:
        if not torch.cuda.is_available() and not interpreting():
            raise BackendUnavailable(
                "backend 'triton' needs a CUDA device (none found); set TRITON_INTERPRET=1 to run its kernels "
                "on CPU tensors in Triton's (slow) interpreter"
            )
        self._flags: dict[torch.device, NonFiniteFlag] = {}

    def non_finite_flag(self, device: torch.device) -> NonFiniteFlag:
        """The flag of ``device`` (created on first use); raises first if an arrived copy shows it set."""
        if device.type == "cuda" and device.index is None:  # the key tensors' devices have: cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        flag = self._flags.get(device)
        if flag is None:
            flag = self._flags[device] = NonFiniteFlag(device)
        flag.raise_if_set()
        return flag

    def raise_if_non_finite(self) -> None:
        """Wait for every device's last flag copy and raise :class:`InvalidGradientError` if one is set."""
        for flag in self._flags.values():
            flag.raise_if_set(wait=True)

    def _select(
        self, g: Tensor, k: int, weight: Tensor | None = None, hits: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Selection (and ``dx`` with ``weight``) under the device's non-finite flag -> ``(vals, idx, dx or None)``."""
        flag = self.non_finite_flag(g.device)
        if weight is None:
            (vals, idx), dx = topk_select(g, k, hits, flag.flag), None
        else:
            vals, idx, dx = topk_dx(g, k, weight, hits, flag.flag)
        flag.publish()
        flag.raise_if_set()
        return vals, idx, dx

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
        return self._select(g, check_k(k, g.shape[1]))[1]

    def sparse_backward(
        self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        self._check_device(g, x, weight)
        self.non_finite_flag(g.device)  # reports an earlier call's non-finite gradient once its copy arrived
        vals = g.gather(1, idx)  # (B, k)
        dx = meprop_dx(vals, idx, weight).to(x.dtype) if need_dx else None
        dw = meprop_dw(vals, idx, x, weight.shape[0])
        return dx, dw.to(weight.dtype)

    def topk_backward(
        self, g: Tensor, x: Tensor, weight: Tensor, k: int, hits: Tensor | None = None, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        self._check_device(g, x, weight)
        vals, idx, dx = self._select(g, check_k(k, g.shape[1]), weight if need_dx else None, hits)
        dw = meprop_dw(vals, idx, x, weight.shape[0])  # write-only: every row once, zeros included
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

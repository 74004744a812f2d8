"""The contract every meProp backend fulfils, and the selection rule they all share.

Shapes used throughout (PyTorch layout, ``y = x @ W.T + b``):

- ``g``:      ``[B, out]``  gradient at the matmul output, ``dL/dy``
- ``x``:      ``[B, in]``   the layer input saved by the forward pass
- ``weight``: ``[out, in]``
- ``idx``:    ``[B, k]``    int64 column indices kept per example, **ascending** within a row
- ``cols``:   ``[k]``       int64 columns kept for the whole minibatch (unified mode), ascending
- ``hits``:   ``[out]``     int64 meSimp counters, incremented in place when given

Selection rule (identical in every backend, so that all select the same indices): a row keeps the
``k`` entries of largest ``|g|``; among equal magnitudes the lower column index wins. Zeros are
selected when a row has fewer than ``k`` non-zero entries. The kept indices are returned in
ascending column order, which is what a threshold selection produces naturally.

Every product launcher takes ``need_dx``: ``False`` says the caller discards ``dx`` (a first layer,
or the LSTM's recurrent weight, whose ``dx`` the time loop has already computed), and the backend
then skips that product and returns ``None`` in its place.

The second half of the contract are the in-place row updates of the lazy optimizers
(:mod:`mesimp_gpu.lazy_optim`): a parameter ``p`` (``[n, ...]``, any number of dimensions >= 1) and
its dense gradient ``grad`` (same shape), of which only the rows ``rows`` of dim 0 (``[r]`` int64,
distinct, on ``p``'s device; ``None``: all of ``p``) are read and updated, with the optimizer state
(same shape as ``p``) alike. ``clip`` clamps each gradient entry to ``[-clip, clip]`` first (``None``:
no clipping). They run under ``torch.no_grad()`` (an optimizer step). The portable versions here
are torch ops; backends with kernels override them for the tensors those kernels take.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import final

import torch
from torch import Tensor


class InvalidGradientError(ValueError):
    """Raised when a gradient that meProp must rank contains NaN or infinity."""


def check_finite(g: Tensor) -> None:
    """Raise :class:`InvalidGradientError` when ``g`` holds NaN or infinity (ranking would be meaningless)."""
    # A finite sum proves every entry finite with one reduction and no [B, out] temporary; only an
    # overflowing sum needs the element-wise check.
    if bool(torch.isfinite(g.sum())):
        return
    if not bool(torch.isfinite(g).all()):
        raise InvalidGradientError(
            "meProp received a non-finite output gradient (NaN or inf); top-k selection is undefined. "
            "Lower the learning rate, enable gradient clipping, or check the loss for overflow."
        )


def check_k(k: int, width: int) -> int:
    """Validate ``k`` against a row of ``width`` entries and return the effective ``min(k, width)``."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return min(k, width)


def masked_gradient(g: Tensor, idx: Tensor) -> Tensor:
    """``G_k``: ``g`` (``[B, out]``) with every entry outside the kept columns ``idx`` (``[B, k]``) zeroed."""
    return torch.zeros_like(g).scatter_(1, idx, g.gather(1, idx))


def bincount_hits(hits: Tensor, idx: Tensor) -> None:
    """Add one to ``hits[j]`` for every occurrence of ``j`` in ``idx`` (any shape), in place."""
    hits += torch.bincount(idx.reshape(-1), minlength=hits.numel()).to(hits.dtype)


def union_rows(pending: list[Tensor], n_rows: int) -> Tensor:
    """Sorted unique rows (``[r]`` int64) of a non-empty list of int64 index tensors (any shapes) in ``[0, n_rows)``."""
    mask = torch.zeros(n_rows, dtype=torch.bool, device=pending[0].device)
    for rows in pending:
        mask.index_fill_(0, rows.reshape(-1), True)
    return mask.nonzero().squeeze(1)


def _clipped_rows(grad: Tensor, rows: Tensor | None, clip: float | None) -> Tensor:
    """A contiguous copy of ``grad`` (or of its ``rows``, ``[r, ...]``), clamped to ``[-clip, clip]`` unless None."""
    g = (grad.clone() if rows is None else grad.index_select(0, rows)).contiguous()  # own copy: clamped in place
    return g if clip is None else g.clamp_(-clip, clip)


def _add_rows_(p: Tensor, rows: Tensor | None, step: Tensor, alpha: float = 1.0) -> None:
    """``p[rows] += alpha * step`` (``step`` ``[r, ...]``), or ``p += alpha * step`` when ``rows`` is None."""
    if rows is None:
        p.add_(step, alpha=alpha)
    else:
        p.index_add_(0, rows, step, alpha=alpha)


#: data-parallel training (:mod:`mesimp_gpu.train.distributed`): sums unified mode's column scores ``[out]``
#: over the processes, so that every process keeps the same column set; None: this process's scores alone
_column_score_reducer: Callable[[Tensor], Tensor] | None = None


def set_column_score_reducer(reducer: Callable[[Tensor], Tensor] | None) -> None:
    """Install (or, with None, remove) the function :meth:`Backend.unified_backward` passes its column scores
    through (``[out]`` -> ``[out]``)."""
    global _column_score_reducer
    _column_score_reducer = reducer


class Backend(ABC):
    """A set of launchers that compute meProp backward products and the lazy optimizers' row updates.

    Subclasses must implement :meth:`topk_indices` and :meth:`sparse_backward`. :meth:`topk_backward`,
    the hooks of :meth:`unified_backward` and the row updates have portable defaults that fast
    backends override.
    """

    #: registry name, e.g. ``"torch"``
    name: str = ""

    @abstractmethod
    def topk_indices(self, g: Tensor, k: int) -> Tensor:
        """Row-wise top-k of ``|g|`` (``[B, out]``) -> ``idx`` ``[B, min(k, out)]`` int64, ascending per row.

        Raises :class:`InvalidGradientError` when ``g`` holds NaN or infinity.
        """

    @abstractmethod
    def sparse_backward(
        self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        """Products with the kept entries ``G_k[b, idx[b, :]] = g[b, idx[b, :]]`` (all others zero).

        Returns ``dx = G_k @ weight`` (``[B, in]``; None when not ``need_dx``) and ``dW = G_k.T @ x``
        (``[out, in]``).
        """

    def topk_backward(
        self, g: Tensor, x: Tensor, weight: Tensor, k: int, hits: Tensor | None = None, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Per-example meProp: select, count ``hits``, then the sparse products. Returns ``(dx or None, dW, idx)``."""
        idx = self.topk_indices(g, k)
        if hits is not None:
            bincount_hits(hits, idx)
        dx, dw = self.sparse_backward(g, idx, x, weight, need_dx)
        return dx, dw, idx

    @final
    def unified_backward(
        self, g: Tensor, x: Tensor, weight: Tensor, k: int, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Unified meProp: one column set ``cols`` for the minibatch, the top-k of ``sum_b |g[b, :]|``.

        Returns ``dx = g[:, cols] @ weight[cols]`` (``[B, in]``; None when not ``need_dx``), ``dW``
        (``[out, in]``: ``dW[cols] = g[:, cols].T @ x``, zero elsewhere) and ``cols`` (``[k]``). The two
        reduced products are dense GEMMs (BLAS, cuBLAS), fast and deterministic on every device, so
        backends differ only in the hooks: :meth:`column_scores`, the selection :meth:`topk_indices`
        and :meth:`scatter_rows`. A non-finite ``g`` makes its scores non-finite, which the selection
        rejects. A reducer installed by :func:`set_column_score_reducer` replaces the scores before the selection
        (data-parallel training sums them over the processes).
        """
        scores = self.column_scores(g)
        if _column_score_reducer is not None:
            scores = _column_score_reducer(scores)
        cols = self.topk_indices(scores.unsqueeze(0), k)[0]  # (k,) ascending
        g_s = g.index_select(1, cols)  # (B, k)
        dx = g_s.mm(weight.index_select(0, cols)) if need_dx else None  # (B, k) @ (k, in)
        dw = self.scatter_rows(g_s.t().mm(x), cols, weight.shape[0])  # (k, B) @ (B, in) into (out, in)
        return dx, dw, cols

    def column_scores(self, g: Tensor) -> Tensor:
        """Unified meProp's column scores ``s_j = sum_b |g[b, j]|``: ``[out]`` from ``g`` ``[B, out]``, in float32
        for a half-precision ``g``, as the kernels accumulate them (sums rounded to 8 or 11 bits would tie
        columns that the other backends rank apart)."""
        return g.abs().sum(dim=0, dtype=torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype)

    def scatter_rows(self, src: Tensor, rows: Tensor, n_rows: int) -> Tensor:
        """A new ``[n_rows, in]`` tensor with ``out[rows[t]] = src[t]`` (``src`` ``[r, in]``, ``rows`` ``[r]``
        distinct int64 in ``[0, n_rows)``) and zeros elsewhere."""
        return src.new_zeros(n_rows, src.shape[1]).index_copy_(0, rows, src)

    def union_rows(self, pending: list[Tensor], n_rows: int) -> Tensor:
        """Sorted unique rows (``[r]`` int64) of a non-empty list of int64 index tensors in ``[0, n_rows)``."""
        return union_rows(pending, n_rows)

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
        """SGD on ``rows`` of ``p``, in place: ``b = momentum * b + g`` (``momentum > 0``; ``b`` is
        ``momentum_buffer``) and ``p -= lr * b``, else ``p -= lr * g``; ``g`` the clipped gradient."""
        g = _clipped_rows(grad, rows, clip)  # (r, ...)
        if momentum:
            if momentum_buffer is None:
                raise ValueError("SGD with momentum needs a momentum buffer")
            if rows is None:
                g = momentum_buffer.mul_(momentum).add_(g)
            else:
                g = momentum_buffer.index_select(0, rows).mul_(momentum).add_(g)
                momentum_buffer.index_copy_(0, rows, g)
        _add_rows_(p, rows, g, alpha=-lr)

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
        """Adam on ``rows`` of ``p`` at step ``step`` (1-based, a float), in place, with torch.optim.Adam's formula.

        ``m = m + (1 - beta1) (g - m)``, ``v = beta2 v + (1 - beta2) g^2`` on ``exp_avg``/``exp_avg_sq``,
        then ``p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``; ``g`` the clipped gradient.
        """
        beta1, beta2 = betas
        g = _clipped_rows(grad, rows, clip)  # (r, ...)
        m = exp_avg if rows is None else exp_avg.index_select(0, rows)
        v = exp_avg_sq if rows is None else exp_avg_sq.index_select(0, rows)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if rows is not None:
            exp_avg.index_copy_(0, rows, m)
            exp_avg_sq.index_copy_(0, rows, v)
        denom = (v.sqrt() / (1.0 - beta2**step) ** 0.5).add_(eps)
        _add_rows_(p, rows, m.div(denom).mul_(-lr / (1.0 - beta1**step)))

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
        """AdaGrad on ``rows`` of ``p``, in place, with torch.optim.Adagrad's formula (no lr decay):
        ``s += g^2`` on ``state_sum``, ``p -= lr * g / (sqrt(s) + eps)``; ``g`` the clipped gradient."""
        g = _clipped_rows(grad, rows, clip)  # (r, ...)
        s = state_sum if rows is None else state_sum.index_select(0, rows)
        s.addcmul_(g, g)
        if rows is not None:
            state_sum.index_copy_(0, rows, s)
        _add_rows_(p, rows, g.div_(s.sqrt().add_(eps)).mul_(-lr))

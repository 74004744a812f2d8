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
"""

from __future__ import annotations

from abc import ABC, abstractmethod

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


class Backend(ABC):
    """A set of launchers that compute meProp backward products.

    Subclasses must implement :meth:`topk_indices` and :meth:`sparse_backward`; the fused
    :meth:`topk_backward` and :meth:`unified_backward` have portable default implementations
    that fast backends override.
    """

    #: registry name, e.g. ``"torch"``
    name: str = ""

    @abstractmethod
    def topk_indices(self, g: Tensor, k: int) -> Tensor:
        """Row-wise top-k of ``|g|`` (``[B, out]``) -> ``idx`` ``[B, k]`` int64, ascending per row."""

    @abstractmethod
    def sparse_backward(self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Products with the kept entries ``G_k[b, idx[b, :]] = g[b, idx[b, :]]`` (all others zero).

        Returns ``dx = G_k @ weight`` (``[B, in]``) and ``dW = G_k.T @ x`` (``[out, in]``).
        """

    def topk_backward(
        self, g: Tensor, x: Tensor, weight: Tensor, k: int, hits: Tensor | None = None, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Per-example meProp: select, then the sparse products. Returns ``(dx, dW, idx)``.

        ``need_dx=False`` says the caller discards ``dx`` (a first layer); a backend may then skip it
        and return None in its place.
        """
        idx = self.topk_indices(g, k)
        if hits is not None:
            bincount_hits(hits, idx)
        dx, dw = self.sparse_backward(g, idx, x, weight)
        return dx, dw, idx

    def unified_backward(self, g: Tensor, x: Tensor, weight: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Unified meProp: one column set ``cols`` for the minibatch, from ``sum_b |g[b, :]|``.

        Returns ``dx = g[:, cols] @ weight[cols]`` (``[B, in]``), ``dW`` (``[out, in]``, zero outside
        ``cols``) and ``cols`` (``[k]``). The two reduced products are dense GEMMs.
        """
        scores = g.abs().sum(dim=0, keepdim=True)  # (1, out)
        cols = self.topk_indices(scores, k)[0]
        g_s = g[:, cols]  # (B, k)
        dx = g_s @ weight[cols]
        dw = torch.zeros_like(weight)
        dw[cols] = g_s.t() @ x
        return dx, dw, cols

"""The portable pure-PyTorch backend: runs on any device torch supports.

Selection is a threshold selection: the k-th largest magnitude of each row (from ``torch.topk``,
whose *value* is exact even though its tie order is unspecified) is the threshold; entries above it
are kept, and entries equal to it fill the remaining slots from the lowest index up
(:func:`threshold_indices`, which the CuPy backend shares with a threshold from its own kernel).
That is O(n) per row after the top-k and gives the lower-index tie rule on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mesimp_gpu.backends.base import Backend, check_finite, check_k


def threshold_indices(a: Tensor, kth: Tensor, k: int) -> Tensor:
    """The selection rule given the threshold: ``[B, k]`` int64 ascending indices into ``a`` (``[B, n]``, ``>= 0``).

    ``kth`` (``[B, 1]``, ``a``'s dtype) must be the ``k``-th largest entry of each row exactly: every
    entry above it is kept, and the entries equal to it fill the remaining slots from the lowest index.
    """
    above = a > kth  # (B, n)
    equal = a == kth
    free = k - above.sum(dim=1, keepdim=True)  # slots left for ties, >= 1
    keep = above | (equal & (equal.cumsum(dim=1) <= free))
    return keep.nonzero()[:, 1].reshape(a.shape[0], k)


def threshold_topk_indices(g: Tensor, k: int) -> Tensor:
    """Row-wise top-k of ``|g|`` (``[B, out]``) -> ``[B, k]`` int64 indices, ascending, ties to lower index."""
    check_finite(g)
    k = check_k(k, g.shape[1])
    a = g.abs()
    kth = a.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values  # (B, 1)
    return threshold_indices(a, kth, k)


class TorchBackend(Backend):
    """Gather for ``dx`` (only the k selected rows of ``W`` per example), one GEMM for ``dW``.

    ``dW`` is computed as ``G_k.T @ x`` from the scattered ``G_k``: a dense GEMM is deterministic on
    every device (an ``index_add_`` would use float atomics on CUDA).
    """

    name = "torch"

    def topk_indices(self, g: Tensor, k: int) -> Tensor:
        return threshold_topk_indices(g, k)

    def sparse_backward(
        self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        vals = g.gather(1, idx)  # (B, k)
        dx = torch.bmm(vals.unsqueeze(1), weight[idx]).squeeze(1) if need_dx else None  # (B, 1, k) @ (B, k, in)
        g_k = torch.zeros_like(g).scatter_(1, idx, vals)  # (B, out)
        dw = g_k.t() @ x
        return dx, dw

"""The reference backend: float64, dense masks, a full stable sort. Slow and obviously right.

Every fast backend is tested against this file. Nothing here is tuned; each product is the
textbook formula applied to the dense masked gradient ``G_k`` (``[B, out]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mesimp_gpu.backends.base import Backend, check_finite, check_k


def topk_mask(g: Tensor, k: int) -> Tensor:
    """Boolean mask ``[B, out]`` of the ``k`` largest ``|g|`` per row, ties to the lower index.

    A stable sort of ``-|g|`` keeps equal magnitudes in ascending column order, so the first
    ``k`` positions of the permutation are exactly the selection rule of :mod:`.base`.
    """
    check_finite(g)
    k = check_k(k, g.shape[1])
    order = torch.sort(-g.abs().double(), dim=1, stable=True).indices[:, :k]  # (B, k)
    mask = torch.zeros(g.shape, dtype=torch.bool, device=g.device)
    mask.scatter_(1, order, True)
    return mask


def mask_to_indices(mask: Tensor) -> Tensor:
    """Boolean mask ``[B, out]`` with the same count per row -> ``[B, count]`` ascending column indices."""
    count = int(mask[0].sum()) if mask.shape[0] else 0
    return mask.nonzero()[:, 1].reshape(mask.shape[0], count)


class ReferenceBackend(Backend):
    """Dense-mask float64 implementation of the :class:`Backend` contract."""

    name = "reference"

    def topk_indices(self, g: Tensor, k: int) -> Tensor:
        return mask_to_indices(topk_mask(g, k))

    def sparse_backward(
        self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        g64 = g.double()
        mask = torch.zeros(g.shape, dtype=torch.bool, device=g.device)
        mask.scatter_(1, idx, True)
        g_k = torch.where(mask, g64, torch.zeros_like(g64))  # (B, out)
        dx = (g_k @ weight.double()).to(x.dtype) if need_dx else None
        dw = g_k.t() @ x.double()
        return dx, dw.to(weight.dtype)

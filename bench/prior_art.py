"""The original authors' per-example meProp, re-created on today's PyTorch: the prior-art baseline.

The authors' PyTorch 0.3 GPU code selects with ``dy.abs().topk(k)``, builds a sparse COO matrix
of the kept entries and multiplies it with ``torch.dsmm`` (here ``torch.sparse.mm``). Many later
re-implementations instead scatter the kept entries into a dense zero matrix and run the two full
GEMMs, which saves no arithmetic at all. Both are timed as baselines. Neither follows the
lower-index tie rule (``torch.topk``'s tie order is unspecified); on continuous random inputs ties
do not occur, so the correctness check against the reference still applies.

Shapes as in :mod:`mesimp_gpu.backends.base`: ``x`` ``[B, in]``, ``weight`` ``[out, in]``, ``g`` ``[B, out]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prior_topk(g: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk`` of ``|g|`` per row -> ``(values [B, k], indices [B, k])`` (unsorted columns)."""
    idx = g.abs().topk(k, dim=1, sorted=False).indices  # (B, k)
    return g.gather(1, idx), idx


class PriorScatterFunction(torch.autograd.Function):
    """Linear map whose backward scatters the top-k into a dense ``G_k`` and runs the full products."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, k: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.k = k
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        vals, idx = prior_topk(g, ctx.k)
        g_k = torch.zeros_like(g).scatter_(1, idx, vals)  # (B, out), dense
        return g_k.mm(weight), g_k.t().mm(x), g.sum(dim=0), None


class PriorSparseFunction(PriorScatterFunction):
    """The same linear map, but the backward multiplies a sparse COO ``G_k`` (the authors' ``torch.dsmm`` code)."""

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        vals, idx = prior_topk(g, ctx.k)
        rows = torch.arange(g.shape[0], device=g.device).repeat_interleave(ctx.k)  # (B k,)
        g_k = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), vals.reshape(-1), g.shape,
                                      check_invariants=False)  # built valid here; checking costs time
        dx = torch.sparse.mm(g_k, weight)  # (B, out) @ (out, in)
        dw = torch.sparse.mm(g_k.t(), x)  # (out, B) @ (B, in)
        return dx, dw, g.sum(dim=0), None

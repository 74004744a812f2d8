"""The reference backend: float64, dense masks, a full stable sort. Slow and obviously right.

Every fast backend is tested against this file. Nothing here is tuned; each product is the
textbook formula applied to the dense masked gradient ``G_k`` (``[B, out]``).
"""

from __future__ import annotations

import math

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


# ------------------------------------------------------------------- how close a fast path must be

#: dtype -> (atol, rtol) of a result computed in that dtype against the float64 reference, both compared
#: in float64. The entry holds as it is for the CPU tests' shapes (sums of up to a few dozen terms);
#: ``tolerance(dtype, terms=n)`` scales atol by sqrt(n) for longer sums (rounding errors add like a
#: random walk). "Worst" below: the largest |error| / (atol + rtol |expected|) over 11 runs of the
#: touched tests of tests/ (10 fixed seeds, one random), Intel Xeon with AVX-512, Triton in its interpreter.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # Only the order of the additions differs from the reference (u = 1.1e-16). Worst: 1/700 (cpu
    # backend, sums of 20 terms), 1/1400 through the LSTM's time steps, optimizer steps and pruning.
    # Before the table: 1e-12 (LSTM vs nn.LSTM, lazy optimizers, pruning), 1e-10 (cpu backend, LSTM
    # vs its autograd reference: now 100x tighter), torch's default 1e-7 (cpu unified products).
    torch.float64: (1e-12, 1e-12),
    # Products accumulated in float32 (u = 6e-8), and float32 optimizer steps against torch.optim's.
    # Worst: 1/7 (cpu products with flushed subnormals), 1/8 (Triton backend), 1/10 (cpu dx summing 20
    # of 257 columns, with terms). Before: 1e-5 (meprop, Triton, CuPy products; GPU row updates: the
    # same), 1e-4 (cpu backend: its shapes now pass ``terms``, 1e-5 * sqrt(n) up to 8e-5, and rtol
    # 1e-5), atol 1e-6 / rtol 1e-5 (row updates against torch.optim: atol now 10x looser, which still
    # sees a wrong state, step count or clip, as those move a weight by 1e-3 or more).
    torch.float32: (1e-5, 1e-5),
    # Results rounded to float16's 11-bit significand (u = 4.9e-4) from float32 arithmetic: 4u also
    # covers a rounding flipped by one ulp between two float32 computations. Worst: 1/13 (row updates).
    # Before: 1e-2 (half-precision row updates); the gpu-marked products keep 2e-2 per sqrt(k) through
    # GPU_MARGIN.
    torch.float16: (2e-3, 2e-3),
    # bfloat16's 8-bit significand (u = 3.9e-3): the same 4u. Worst: 1/4 (row updates). Before: atol
    # 5e-2, rtol 1e-2 (row updates).
    torch.bfloat16: (1.6e-2, 1.6e-2),
}



def tolerance(dtype: torch.dtype, terms: int | None = None) -> tuple[float, float]:
    """``(atol, rtol)`` for a result in ``dtype`` against the float64 reference; ``terms``: how many products
    each compared element sums, for sums longer than the CPU tests' shapes (atol grows with ``sqrt(terms)``)."""
    atol, rtol = TOLERANCES[dtype]
    if terms is not None:
        if terms < 1:
            raise ValueError(f"terms must be at least 1, got {terms}")
        atol *= math.sqrt(terms)
    return atol, rtol

"""Unified meProp: one column set for the whole minibatch, then two reduced dense products.

Maths, with ``G`` ``[B, out]``, ``x`` ``[B, in]``, ``W`` ``[out, in]``:

1. Column scores ``s_j = sum_b |G[b, j]|`` (float32 accumulation, rows summed in ascending order by
   one program per column block: deterministic, no atomics).
2. ``cols`` = the top-k of ``s`` with the shared selection rule (the one-row case of
   :func:`mesimp_gpu.kernels.topk.topk_select`), ascending.
3. ``dx = G[:, cols] @ W[cols]`` (``[B, k] @ [k, in]``) and ``dW[cols] = G[:, cols]^T @ x``
   (``[k, B] @ [B, in]``); all other rows of ``dW`` are zero.

The two products in step 3 are small dense GEMMs on gathered operands. They go to cuBLAS through
torch (``index_select`` + ``mm``): for these shapes cuBLAS runs at or near peak with tensor cores and
is deterministic, whereas a Triton ``tl.dot`` kernel fusing the gather would at best match it and add
autotuning to maintain. Only the score reduction and the selection, which torch would do in several
passes with an unspecified tie order, are Triton kernels.

Pointers of the score kernel: ``g_ptr`` ``[B, out]`` (contiguous), ``scores_ptr`` ``[out]`` float32.
Grid: ``(ceil(out / BLOCK_N),)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mesimp_gpu.kernels.gather import output_buffer
from mesimp_gpu.kernels.topk import topk_select


@triton.jit
def _column_abs_sum_kernel(g_ptr, scores_ptr, batch, n, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_mask = cols < n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for b_start in range(0, batch, BLOCK_B):
        rows = (b_start + tl.arange(0, BLOCK_B)).to(tl.int64)  # (BLOCK_B,)
        tile = tl.load(
            g_ptr + rows[:, None] * n + cols[None, :], mask=(rows < batch)[:, None] & col_mask[None, :], other=0.0
        )  # (BLOCK_B, BLOCK_N)
        acc += tl.sum(tl.abs(tile.to(tl.float32)), axis=0)
    tl.store(scores_ptr + cols, acc, mask=col_mask)


def column_scores(g: Tensor, out: Tensor | None = None) -> Tensor:
    """``s = sum_b |g[b, :]|`` for ``g`` ``[B, out]`` -> ``[out]`` float32 (deterministic), into ``out`` if given."""
    if g.dim() != 2:
        raise ValueError(f"g must be 2-D [B, out], got shape {tuple(g.shape)}")
    g = g.contiguous()
    batch, n = g.shape
    scores = output_buffer(out, (n,), torch.float32, g.device, "scores")
    block_n = min(128, triton.next_power_of_2(n))
    _column_abs_sum_kernel[(triton.cdiv(n, block_n),)](
        g, scores, batch, n, BLOCK_B=min(32, triton.next_power_of_2(max(batch, 1))), BLOCK_N=block_n
    )
    return scores


def unified_backward(g: Tensor, x: Tensor, weight: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Unified meProp -> ``(dx [B, in], dW [out, in], cols [k] int64 ascending)``; see the module docstring."""
    if x.dim() != 2 or weight.dim() != 2 or g.shape[0] != x.shape[0] or weight.shape != (g.shape[1], x.shape[1]):
        raise ValueError(
            "expected g [B, out], x [B, in], weight [out, in]; "
            f"got {tuple(g.shape)}, {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    scores = column_scores(g)
    _, cols = topk_select(scores.unsqueeze(0), k)
    cols = cols[0]
    g_s = g.index_select(1, cols)  # (B, k)
    dx = g_s @ weight.index_select(0, cols)  # (B, in)
    dw = torch.zeros_like(weight)
    dw.index_copy_(0, cols, g_s.t() @ x)  # (k, in) into the selected rows
    return dx, dw, cols

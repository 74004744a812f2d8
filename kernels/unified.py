"""Unified meProp's column scores ``s_j = sum_b |G[b, j]|`` for ``G`` ``[B, out]``.

Unified meProp keeps one column set for the whole minibatch: the top-k of ``s`` under the shared
selection rule (the one-row case of :func:`mesimp_gpu.kernels.topk.topk_select`), then two reduced
dense products ``dx = G[:, cols] @ W[cols]`` and ``dW[cols] = G[:, cols]^T @ x``, which
:meth:`mesimp_gpu.backends.base.Backend.unified_backward` runs as cuBLAS GEMMs through torch: for
these shapes cuBLAS runs at or near peak with tensor cores and is deterministic, whereas a Triton
``tl.dot`` kernel fusing the gather would at best match it and add autotuning to maintain. Only the
score reduction and the selection, which torch would do in several passes with an unspecified tie
order, are Triton kernels.

The scores accumulate in float32, the rows summed in ascending order by one program per column
block: deterministic, no atomics.

Pointers: ``g_ptr`` ``[B, out]`` (contiguous), ``scores_ptr`` ``[out]`` float32.
Grid: ``(ceil(out / BLOCK_N),)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mesimp_gpu.kernels import launch


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
    scores = launch.output_buffer(out, (n,), torch.float32, g.device, "scores")
    block_n = min(128, triton.next_power_of_2(n))
    with launch.on_device(g):
        _column_abs_sum_kernel[(triton.cdiv(n, block_n),)](
            g, scores, batch, n, BLOCK_B=min(32, triton.next_power_of_2(max(batch, 1))), BLOCK_N=block_n
        )
    return scores

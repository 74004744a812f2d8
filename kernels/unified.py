"""Unified meProp's column scores ``s_j = sum_b |G[b, j]|`` for ``G`` ``[B, out]``.

Unified meProp keeps one column set for the whole minibatch: the top-k of ``s`` under the shared
selection rule (the one-row case of :func:`mesimp_gpu.kernels.topk.topk_select`), then two reduced
dense products ``dx = G[:, cols] @ W[cols]`` and ``dW[cols] = G[:, cols]^T @ x``, which
:meth:`mesimp_gpu.backends.base.Backend.unified_backward` runs as cuBLAS GEMMs through torch: for
these shapes cuBLAS runs at or near peak with tensor cores and is deterministic, whereas a Triton
``tl.dot`` kernel fusing the gather would at best match it and add autotuning to maintain. Only the
score reduction and the selection, which torch would do in several passes with an unspecified tie
order, are Triton kernels.

The scores accumulate in float32 and deterministically, without atomics: program ``(c, p)`` sums the
rows ``p, p + P, p + 2P, ...`` (in blocks of ``BLOCK_B``) of column block ``c`` element-wise into a
``(BLOCK_B, BLOCK_N)`` accumulator, with one cross-warp reduction at the end (a reduction in every
iteration would put a barrier in the loop), and writes partial sums ``[P, out]``; the ``P`` partials
are then added in a fixed order. ``P`` is chosen so that the grid has about two programs per SM.

Pointers: ``g_ptr`` ``[B, out]`` (contiguous), ``partial_ptr`` ``[P, out]`` float32.
Grid: ``(ceil(out / BLOCK_N), P)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mesimp_gpu.kernels import launch

#: SMs assumed where the device cannot be asked (the interpreter)
_DEFAULT_SMS = 4


@triton.jit
def _column_abs_sum_kernel(g_ptr, partial_ptr, batch, n, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_mask = cols < n
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for b_start in range(part * BLOCK_B, batch, parts * BLOCK_B):
        rows = (b_start + tl.arange(0, BLOCK_B)).to(tl.int64)  # (BLOCK_B,)
        tile = tl.load(
            g_ptr + rows[:, None] * n + cols[None, :], mask=(rows < batch)[:, None] & col_mask[None, :], other=0.0
        )  # (BLOCK_B, BLOCK_N)
        acc += tl.abs(tile.to(tl.float32))
    tl.store(partial_ptr + part * n + cols, tl.sum(acc, axis=0), mask=col_mask)


def column_scores(g: Tensor, out: Tensor | None = None) -> Tensor:
    """``s = sum_b |g[b, :]|`` for ``g`` ``[B, out]`` -> ``[out]`` float32 (deterministic), into ``out`` if given."""
    if g.dim() != 2:
        raise ValueError(f"g must be 2-D [B, out], got shape {tuple(g.shape)}")
    g = g.contiguous()
    batch, n = g.shape
    scores = launch.output_buffer(out, (n,), torch.float32, g.device, "scores")
    block_n = min(64, triton.next_power_of_2(max(n, 1)))
    block_b = min(32, triton.next_power_of_2(max(batch, 1)))
    col_blocks = triton.cdiv(n, block_n)
    sms = torch.cuda.get_device_properties(g.device).multi_processor_count if g.device.type == "cuda" else _DEFAULT_SMS
    parts = max(1, min(triton.cdiv(batch, 4 * block_b), triton.cdiv(2 * sms, col_blocks)))
    if n == 0:
        return scores
    partial = torch.empty(parts, n, dtype=torch.float32, device=g.device)
    with launch.on_device(g):
        _column_abs_sum_kernel[(col_blocks, parts)](g, partial, batch, n, BLOCK_B=block_b, BLOCK_N=block_n)
    return torch.sum(partial, dim=0, out=scores)

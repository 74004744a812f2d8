"""``dx = G_k @ W`` for per-example kept entries: each example gathers its ``k`` rows of ``W``.

Maths: ``dx[b, i] = sum_{s < k} vals[b, s] * W[idx[b, s], i]``, accumulated in float32. Only the
``k`` selected rows of ``W`` are read per example, so the cost is ``B * k * in`` instead of
``B * out * in``. Each output element is owned by exactly one program (no atomics).

Pointers (contiguous, row-major):

- ``vals_ptr``: ``[B, k]``   kept gradient values
- ``idx_ptr``:  ``[B, k]``   int64 kept columns (rows of ``W``)
- ``w_ptr``:    ``[out, in]``
- ``dx_ptr``:   ``[B, in]``  written completely

Grid: ``(B, ceil(in / BLOCK_IN))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mesimp_gpu.kernels import launch


@triton.jit
def gather_rows_dot(vals_row_ptr, idx_row_ptr, k, w_ptr, n_in, in_cols, BLOCK_K: tl.constexpr, BLOCK_IN: tl.constexpr):
    """``sum_s vals[s] * W[idx[s], in_cols]`` over the ``k`` entries of one example -> float32 ``(BLOCK_IN,)``."""
    in_mask = in_cols < n_in
    acc = tl.zeros((BLOCK_IN,), dtype=tl.float32)
    for k_start in range(0, k, BLOCK_K):
        slots = k_start + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        k_mask = slots < k
        rows = tl.load(idx_row_ptr + slots, mask=k_mask, other=0)  # (BLOCK_K,) int64
        v = tl.load(vals_row_ptr + slots, mask=k_mask, other=0.0).to(tl.float32)  # (BLOCK_K,)
        w = tl.load(
            w_ptr + rows[:, None] * n_in + in_cols[None, :], mask=k_mask[:, None] & in_mask[None, :], other=0.0
        ).to(tl.float32)  # (BLOCK_K, BLOCK_IN)
        acc += tl.sum(v[:, None] * w, axis=0)
    return acc


@triton.jit
def _meprop_dx_kernel(vals_ptr, idx_ptr, w_ptr, dx_ptr, k, n_in, BLOCK_K: tl.constexpr, BLOCK_IN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    in_cols = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)  # (BLOCK_IN,)
    acc = gather_rows_dot(vals_ptr + row * k, idx_ptr + row * k, k, w_ptr, n_in, in_cols, BLOCK_K, BLOCK_IN)
    tl.store(dx_ptr + row * n_in + in_cols, acc.to(dx_ptr.dtype.element_ty), mask=in_cols < n_in)


def meprop_dx(vals: Tensor, idx: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """``dx = G_k @ weight`` from ``vals``/``idx`` (``[B, k]``) and ``weight`` (``[out, in]``) -> ``[B, in]``.

    ``dx`` has ``weight``'s dtype and is written to ``out`` when given (contiguous ``[B, in]``).
    Indices must lie in ``[0, out)`` (not checked on the device).
    """
    if vals.shape != idx.shape or vals.dim() != 2:
        raise ValueError(f"vals and idx must both be [B, k], got {tuple(vals.shape)} and {tuple(idx.shape)}")
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got {idx.dtype}")
    if weight.dim() != 2 or not (vals.device == idx.device == weight.device):
        raise ValueError("weight must be 2-D [out, in] on the same device as vals and idx")
    vals, idx, weight = vals.contiguous(), idx.contiguous(), weight.contiguous()
    batch, k = vals.shape
    n_in = weight.shape[1]
    dx = launch.output_buffer(out, (batch, n_in), weight.dtype, weight.device, "dx")
    block_in = min(128, triton.next_power_of_2(n_in))
    if batch and k:
        with launch.on_device(dx):
            _meprop_dx_kernel[(batch, triton.cdiv(n_in, block_in))](
                vals, idx, weight, dx, k, n_in, BLOCK_K=min(32, triton.next_power_of_2(k)), BLOCK_IN=block_in
            )
    else:
        dx.zero_()
    return dx

"""The weight side of meProp: ``dW = G_k^T x`` row by row, accumulated into a ``dW`` buffer.

Maths: row ``j`` of ``dW`` is ``D_j = sum_{(b, s): idx[b, s] = j} vals[b, s] * x[b, :]``, a sum of
sparse outer products. Only rows touched by some example are non-zero; ``dW[j] += D_j``.

Determinism: the ``B * k`` entries are sorted by column (a stable sort, so entries of one column stay
in ascending example order) and cut into per-column segments ``ptr[j] .. ptr[j + 1]``. One program
owns one ``(row j, BLOCK_IN columns)`` tile and sums its segment in a fixed order, so there are no
float atomics and ``dW`` is bitwise reproducible run to run.

Pointers (contiguous, row-major):

- ``vals_ptr``: ``[B * k]``  kept values, sorted by column
- ``src_ptr``:  ``[B * k]``  int64 example of each sorted entry
- ``ptr_ptr``:  ``[out + 1]`` int64 segment starts per column
- ``x_ptr``:    ``[B, in]``
- ``dw_ptr``:   ``[out, in]``

Grid: ``(out, ceil(in / BLOCK_IN))``; programs of untouched rows exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mesimp_gpu.kernels import launch


@triton.jit
def _meprop_dw_kernel(
    vals_ptr, src_ptr, ptr_ptr, x_ptr, dw_ptr, n_in, BLOCK_E: tl.constexpr, BLOCK_IN: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    in_cols = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)  # (BLOCK_IN,)
    in_mask = in_cols < n_in
    seg_start = tl.load(ptr_ptr + row)
    seg_end = tl.load(ptr_ptr + row + 1)
    if seg_end > seg_start:
        acc = tl.zeros((BLOCK_IN,), dtype=tl.float32)
        for e_start in range(seg_start, seg_end, BLOCK_E):
            entries = e_start + tl.arange(0, BLOCK_E)  # (BLOCK_E,)
            e_mask = entries < seg_end
            src = tl.load(src_ptr + entries, mask=e_mask, other=0)  # (BLOCK_E,) int64
            v = tl.load(vals_ptr + entries, mask=e_mask, other=0.0).to(tl.float32)  # (BLOCK_E,)
            xt = tl.load(
                x_ptr + src[:, None] * n_in + in_cols[None, :], mask=e_mask[:, None] & in_mask[None, :], other=0.0
            ).to(tl.float32)  # (BLOCK_E, BLOCK_IN)
            acc += tl.sum(v[:, None] * xt, axis=0)
        offs = row * n_in + in_cols  # (BLOCK_IN,)
        dw = tl.load(dw_ptr + offs, mask=in_mask, other=0.0).to(tl.float32)
        tl.store(dw_ptr + offs, (dw + acc).to(dw_ptr.dtype.element_ty), mask=in_mask)


def column_segments(vals: Tensor, idx: Tensor, out_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sort the kept entries by column -> ``(vals_sorted [B*k], src [B*k] int64, ptr [out + 1] int64)``.

    A stable sort keeps the entries of one column in ascending example order; ``ptr`` comes from a
    ``searchsorted`` (no atomics, no host synchronisation), so the segments are deterministic.
    """
    k = idx.shape[1]
    flat = idx.reshape(-1)
    sorted_cols, order = torch.sort(flat, stable=True)
    ptr = torch.searchsorted(sorted_cols, torch.arange(out_features + 1, device=idx.device, dtype=torch.int64))
    return vals.reshape(-1)[order].contiguous(), order // k, ptr


def meprop_dw(vals: Tensor, idx: Tensor, x: Tensor, out_features: int, dw: Tensor | None = None) -> Tensor:
    """``dW += G_k^T x`` (``[out, in]``) from ``vals``/``idx`` (``[B, k]``) and ``x`` (``[B, in]``).

    ``dw`` (contiguous ``[out, in]``) is accumulated into in place and returned; without it a zero
    buffer of ``x``'s dtype is allocated. Deterministic (see the module docstring).
    """
    if vals.dim() != 2 or vals.shape != idx.shape or idx.dtype != torch.int64:
        raise ValueError(
            f"vals and idx must be [B, k] (idx int64), got {tuple(vals.shape)}, {tuple(idx.shape)} {idx.dtype}"
        )
    if x.dim() != 2 or x.shape[0] != vals.shape[0]:
        raise ValueError(f"x must be [B={vals.shape[0]}, in], got {tuple(x.shape)}")
    if not (vals.device == idx.device == x.device):
        raise ValueError("vals, idx and x must be on one device")
    n_in = x.shape[1]
    if dw is None:
        dw = torch.zeros(out_features, n_in, dtype=x.dtype, device=x.device)
    if dw.shape != (out_features, n_in) or dw.device != x.device or not dw.is_contiguous():
        raise ValueError(f"dw must be contiguous [{out_features}, {n_in}] on {x.device}, got {tuple(dw.shape)}")
    if out_features == 0 or n_in == 0 or idx.numel() == 0:
        return dw
    vals_sorted, src, ptr = column_segments(vals, idx, out_features)
    block_in = min(128, triton.next_power_of_2(n_in))
    with launch.on_device(dw):
        _meprop_dw_kernel[(out_features, triton.cdiv(n_in, block_in))](
            vals_sorted, src, ptr, x.contiguous(), dw, n_in, BLOCK_E=16, BLOCK_IN=block_in
        )
    return dw

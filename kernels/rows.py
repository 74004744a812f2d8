"""The weight side of meProp: ``dW = G_k^T x`` row by row, written or accumulated into a ``dW`` buffer.

Maths: row ``j`` of ``dW`` is ``D_j = sum_{(b, s): idx[b, s] = j} vals[b, s] * x[b, :]``, a sum of
sparse outer products. Only rows touched by some example are non-zero. Two modes:

- write-only (the default): ``dW[j] = D_j`` for every row, zeros included, so ``dW`` needs no zero
  fill beforehand and is never read: ``out x in`` elements written once (a ``torch.zeros`` followed
  by a read-modify-write of it would move three times as many bytes);
- accumulate (``dw`` given): ``dW[j] += D_j`` on the touched rows only.

Determinism: the ``B * k`` entries are sorted by column (a stable sort, so entries of one column stay
in ascending example order) and cut into per-column segments ``ptr[j] .. ptr[j + 1]``. One program
owns one row ``j`` and ``TILES`` consecutive tiles of ``BLOCK_IN`` columns and sums its segment in a
fixed order for each tile, so there are no float atomics and ``dW`` is bitwise reproducible run to
run. Several tiles per program cut the number of programs (and of reloads of ``ptr``) by ``TILES``.

Pointers (contiguous, row-major):

- ``vals_ptr``: ``[B * k]``  kept values, sorted by column
- ``src_ptr``:  ``[B * k]``  int64 example of each sorted entry
- ``ptr_ptr``:  ``[out + 1]`` int64 segment starts per column
- ``x_ptr``:    ``[B, in]``
- ``dw_ptr``:   ``[out, in]``

Grid: ``(out, ceil(in / (TILES * BLOCK_IN)))``; in accumulate mode, programs of untouched rows exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mesimp_gpu.kernels import launch

#: column tiles of BLOCK_IN per program
TILES = 4


@triton.jit
def _row_tiles(
    vals_ptr, src_ptr, x_ptr, dw_ptr, row, seg_start, seg_end, n_in,
    ACCUMULATE: tl.constexpr, TILES: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_IN: tl.constexpr,
):
    """Row ``row`` of ``dW`` over this program's ``TILES`` column tiles from its segment of entries."""
    for tile in tl.static_range(TILES):
        in_cols = (tl.program_id(1) * TILES + tile) * BLOCK_IN + tl.arange(0, BLOCK_IN)  # (BLOCK_IN,)
        in_mask = in_cols < n_in
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
        if ACCUMULATE:
            acc += tl.load(dw_ptr + offs, mask=in_mask, other=0.0).to(tl.float32)
        tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=in_mask)


@triton.jit
def _meprop_dw_kernel(
    vals_ptr,
    src_ptr,
    ptr_ptr,
    x_ptr,
    dw_ptr,
    n_in,
    ACCUMULATE: tl.constexpr,
    TILES: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seg_start = tl.load(ptr_ptr + row)
    seg_end = tl.load(ptr_ptr + row + 1)
    if ACCUMULATE:
        if seg_end > seg_start:  # untouched rows keep their values
            _row_tiles(vals_ptr, src_ptr, x_ptr, dw_ptr, row, seg_start, seg_end, n_in, ACCUMULATE, TILES, BLOCK_E,
                       BLOCK_IN)
    else:  # every row is written, untouched ones with zeros (an empty segment)
        _row_tiles(vals_ptr, src_ptr, x_ptr, dw_ptr, row, seg_start, seg_end, n_in, ACCUMULATE, TILES, BLOCK_E,
                   BLOCK_IN)


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


def meprop_dw(
    vals: Tensor, idx: Tensor, x: Tensor, out_features: int, dw: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """``dW = G_k^T x`` (``[out, in]``) from ``vals``/``idx`` (``[B, k]``) and ``x`` (``[B, in]``).

    With ``dw`` (contiguous ``[out, in]``) the product is accumulated into it in place (``dW += ...``)
    and ``dw`` returned; otherwise every row is written once, zeros included, into ``out`` (contiguous
    ``[out, in]`` of ``x``'s dtype) or a fresh buffer. Deterministic (see the module docstring).
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
    accumulate = dw is not None
    if dw is None:
        dw = launch.output_buffer(out, (out_features, n_in), x.dtype, x.device, "out")
    elif dw.shape != (out_features, n_in) or dw.device != x.device or not dw.is_contiguous():
        raise ValueError(f"dw must be contiguous [{out_features}, {n_in}] on {x.device}, got {tuple(dw.shape)}")
    if out_features == 0 or n_in == 0:
        return dw
    if idx.numel() == 0:
        return dw if accumulate else dw.zero_()
    vals_sorted, src, ptr = column_segments(vals, idx, out_features)
    block_in = min(128, triton.next_power_of_2(n_in))
    tiles = min(TILES, triton.cdiv(n_in, block_in))
    with launch.on_device(dw):
        _meprop_dw_kernel[(out_features, triton.cdiv(n_in, tiles * block_in))](
            vals_sorted, src, ptr, x.contiguous(), dw, n_in, ACCUMULATE=accumulate, TILES=tiles, BLOCK_E=16,
            BLOCK_IN=block_in,
        )
    return dw

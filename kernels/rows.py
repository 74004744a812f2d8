"""The weight side of meProp: ``dW = G_k^T x`` row by row, accumulated or applied to ``W`` directly.

Maths: row ``j`` of ``dW`` is ``D_j = sum_{(b, s): idx[b, s] = j} vals[b, s] * x[b, :]``, a sum of
sparse outer products. Only rows touched by some example are non-zero.

Determinism: the ``B * k`` entries are sorted by column (a stable sort, so entries of one column stay
in ascending example order) and cut into per-column segments ``ptr[j] .. ptr[j + 1]``. One program
owns one ``(row j, BLOCK_IN columns)`` tile and sums its segment in a fixed order, so there are no
float atomics and ``dW`` is bitwise reproducible run to run.

What a program does with ``D_j`` (``MODE``):

- ``ACCUMULATE``: ``dW[j] += D_j`` into a caller's buffer (a fresh zero buffer by default).
- ``SGD``: ``W[j] -= lr * D_j``; a dense ``dW`` is never materialised.
- ``ADAM`` (lazy Adam: the moments of untouched rows are not decayed), with ``D_j`` optionally
  clipped element-wise to ``[-clip, clip]`` first, and ``c1 = 1 - beta1^t``, ``c2 = 1 - beta2^t``::

      m[j] = beta1 m[j] + (1 - beta1) D_j
      v[j] = beta2 v[j] + (1 - beta2) D_j^2
      W[j] -= (lr / c1) * m[j] / (sqrt(v[j]) / sqrt(c2) + eps)        (torch.optim.Adam's formula)

Pointers (contiguous, row-major):

- ``vals_ptr``: ``[B * k]``  kept values, sorted by column
- ``src_ptr``:  ``[B * k]``  int64 example of each sorted entry
- ``ptr_ptr``:  ``[out + 1]`` int64 segment starts per column
- ``x_ptr``:    ``[B, in]``
- ``dst_ptr``:  ``[out, in]`` ``dW`` (ACCUMULATE) or ``W`` (SGD, ADAM)
- ``m_ptr``, ``v_ptr``: ``[out, in]`` Adam moments (ADAM only), float32

Grid: ``(out, ceil(in / BLOCK_IN))``; programs of untouched rows exit at once.
"""

from __future__ import annotations

import enum
import math

import torch
import triton
import triton.language as tl
from torch import Tensor


class RowMode(enum.IntEnum):
    """What the row kernel does with ``D_j``."""

    ACCUMULATE = 0
    SGD = 1
    ADAM = 2


@triton.jit
def _meprop_rows_kernel(
    vals_ptr,
    src_ptr,
    ptr_ptr,
    x_ptr,
    dst_ptr,
    m_ptr,
    v_ptr,
    n_in,
    lr,
    beta1,
    beta2,
    eps,
    step_size,
    inv_sqrt_c2,
    clip,
    MODE: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_IN: tl.constexpr,
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
        dst = tl.load(dst_ptr + offs, mask=in_mask, other=0.0).to(tl.float32)
        if MODE == 0:
            new = dst + acc
        elif MODE == 1:
            new = dst - lr * acc
        else:
            if CLIP:
                acc = tl.minimum(tl.maximum(acc, -clip), clip)
            m = beta1 * tl.load(m_ptr + offs, mask=in_mask, other=0.0) + (1.0 - beta1) * acc
            v2 = beta2 * tl.load(v_ptr + offs, mask=in_mask, other=0.0) + (1.0 - beta2) * acc * acc
            tl.store(m_ptr + offs, m, mask=in_mask)
            tl.store(v_ptr + offs, v2, mask=in_mask)
            new = dst - step_size * m / (tl.sqrt(v2) * inv_sqrt_c2 + eps)
        tl.store(dst_ptr + offs, new.to(dst_ptr.dtype.element_ty), mask=in_mask)


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


def _check_entries(vals: Tensor, idx: Tensor, x: Tensor) -> None:
    if vals.dim() != 2 or vals.shape != idx.shape or idx.dtype != torch.int64:
        raise ValueError(
            f"vals and idx must be [B, k] (idx int64), got {tuple(vals.shape)}, {tuple(idx.shape)} {idx.dtype}"
        )
    if x.dim() != 2 or x.shape[0] != vals.shape[0]:
        raise ValueError(f"x must be [B={vals.shape[0]}, in], got {tuple(x.shape)}")
    if not (vals.device == idx.device == x.device):
        raise ValueError("vals, idx and x must be on one device")


def _check_rows_tensor(name: str, t: Tensor, out_features: int, x: Tensor) -> None:
    if t.shape != (out_features, x.shape[1]) or t.device != x.device or not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous [{out_features}, {x.shape[1]}] on {x.device}, got {tuple(t.shape)}"
        )


def _launch_rows(
    vals: Tensor,
    idx: Tensor,
    x: Tensor,
    dst: Tensor,
    mode: RowMode,
    m: Tensor | None = None,
    v: Tensor | None = None,
    lr: float = 0.0,
    betas: tuple[float, float] = (0.0, 0.0),
    eps: float = 0.0,
    step: int = 1,
    clip: float | None = None,
) -> None:
    out_features, n_in = dst.shape
    if out_features == 0 or n_in == 0 or idx.numel() == 0:
        return
    vals_sorted, src, ptr = column_segments(vals, idx, out_features)
    c1, c2 = 1.0 - betas[0] ** step, 1.0 - betas[1] ** step
    block_in = min(128, triton.next_power_of_2(n_in))
    _meprop_rows_kernel[(out_features, triton.cdiv(n_in, block_in))](
        vals_sorted,
        src,
        ptr,
        x.contiguous(),
        dst,
        m if m is not None else dst,
        v if v is not None else dst,
        n_in,
        lr,
        betas[0],
        betas[1],
        eps,
        lr / c1 if mode is RowMode.ADAM else 0.0,
        1.0 / math.sqrt(c2) if mode is RowMode.ADAM else 0.0,
        clip if clip is not None else 0.0,
        MODE=int(mode),
        CLIP=clip is not None,
        BLOCK_E=16,
        BLOCK_IN=block_in,
    )


def meprop_dw(vals: Tensor, idx: Tensor, x: Tensor, out_features: int, dw: Tensor | None = None) -> Tensor:
    """``dW += G_k^T x`` (``[out, in]``) from ``vals``/``idx`` (``[B, k]``) and ``x`` (``[B, in]``).

    ``dw`` (contiguous ``[out, in]``) is accumulated into in place and returned; without it a zero
    buffer of ``x``'s dtype is allocated. Deterministic (see the module docstring).
    """
    _check_entries(vals, idx, x)
    if dw is None:
        dw = torch.zeros(out_features, x.shape[1], dtype=x.dtype, device=x.device)
    _check_rows_tensor("dw", dw, out_features, x)
    _launch_rows(vals, idx, x, dw, RowMode.ACCUMULATE)
    return dw


def meprop_sgd_update(vals: Tensor, idx: Tensor, x: Tensor, weight: Tensor, lr: float) -> None:
    """In place ``weight[j] -= lr * (G_k^T x)[j]`` on the touched rows only; ``weight`` is ``[out, in]``."""
    _check_entries(vals, idx, x)
    _check_rows_tensor("weight", weight, weight.shape[0], x)
    _launch_rows(vals, idx, x, weight, RowMode.SGD, lr=lr)


def meprop_adam_update(
    vals: Tensor,
    idx: Tensor,
    x: Tensor,
    weight: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    clip: float | None = None,
) -> None:
    """Lazy Adam on the touched rows of ``weight`` (``[out, in]``), in place, with float32 moments.

    ``step`` is the 1-based step count used for bias correction; ``clip`` clips the gradient
    element-wise before the moments (the meSimp reference uses 5). Rows no example selected keep
    their weights and moments unchanged.
    """
    _check_entries(vals, idx, x)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    out_features = weight.shape[0]
    _check_rows_tensor("weight", weight, out_features, x)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_rows_tensor(name, t, out_features, x)
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    _launch_rows(vals, idx, x, weight, RowMode.ADAM, exp_avg, exp_avg_sq, lr, betas, eps, step, clip)

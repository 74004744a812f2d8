"""In-place optimizer updates of given rows of a dense parameter, from its dense gradient.

The lazy optimizers (:mod:`mesimp_gpu.lazy_optim`) update only the rows of a weight that per-example
meProp touched. The parameter ``p`` is viewed as ``[n, width]`` (``width`` = elements per row of dim 0)
and only the rows listed in ``rows`` are read and written, with the optimizer state alike. With
``g`` = the gradient entry, clamped to ``[-clip, clip]`` first when ``CLIP``, and float32 arithmetic:

- SGD: ``b = momentum * b + g`` and ``p -= lr * b`` with ``MOMENTUM``, else ``p -= lr * g``.
- Adam, torch.optim.Adam's formula at step ``t`` (``c1 = 1 - beta1^t``, ``c2 = 1 - beta2^t``, computed
  by the launcher from a float ``t``)::

      m = m + (1 - beta1) (g - m)
      v = beta2 v + (1 - beta2) g^2
      p -= (lr / c1) * m / (sqrt(v) / sqrt(c2) + eps)

- AdaGrad, torch.optim.Adagrad's formula without lr decay: ``s += g^2``, ``p -= lr * g / (sqrt(s) + eps)``.

Square roots and the divisions by the running statistics are IEEE round-to-nearest
(``sqrt_rn``/``div_rn``), as torch's CUDA kernels compute them, not the approximate instructions.

Pointers (contiguous, row-major; state tensors have ``p``'s shape and dtype):

- ``p_ptr``, ``grad_ptr``:  ``[n, width]``  float32 / float16 / bfloat16
- ``buf_ptr``:              ``[n, width]``  SGD momentum buffer (read only when ``MOMENTUM``)
- ``m_ptr``, ``v_ptr``:     ``[n, width]``  Adam's ``exp_avg``, ``exp_avg_sq``
- ``sum_ptr``:              ``[n, width]``  AdaGrad's ``sum``
- ``rows_ptr``:             ``[r]``         int64 distinct rows (read only when ``HAS_ROWS``)

One program per (listed row, block of ``BLOCK`` columns), on a 1-D grid of ``r * n_blocks`` programs
(no grid-axis limit on the number of rows): program ``pid`` updates row ``rows[pid // n_blocks]``,
columns ``(pid % n_blocks) * BLOCK + [0, BLOCK)``. Without ``rows`` the launchers view ``p`` as one row
of all its elements, so a bias or a dense update is as many programs as blocks. Each element is
owned by one program: no atomics, deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mesimp_gpu.kernels import launch as launching

#: columns per program (4 warps: 8 elements per thread)
MAX_BLOCK = 1024
#: parameter dtypes the kernels update (state has the parameter's dtype; arithmetic is float32)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _row_block(rows_ptr, width, n_blocks, HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Element offsets ``(BLOCK,)`` int64 of this program's block, and the mask of those inside the row."""
    pid = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid // n_blocks)  # int64
    else:
        row = (pid // n_blocks).to(tl.int64)
    # the block's start in int64 (without rows, one "row" is the whole parameter, which may pass 2^31
    # elements); the lanes stay int32, compared with the scalar count of columns left in the row
    start = (pid % n_blocks).to(tl.int64) * BLOCK
    left = tl.minimum(width - start, BLOCK).to(tl.int32)
    lanes = tl.arange(0, BLOCK)  # (BLOCK,)
    return row * width + start + lanes, lanes < left


@triton.jit
def _load_grad(grad_ptr, offs, mask, clip, CLIP: tl.constexpr):
    """The gradient block as float32 ``(BLOCK,)``, clamped to ``[-clip, clip]`` when ``CLIP``."""
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLIP:
        g = tl.minimum(tl.maximum(g, -clip), clip)
    return g


@triton.jit
def _sgd_rows_kernel(
    p_ptr,
    grad_ptr,
    buf_ptr,
    rows_ptr,
    width,
    n_blocks,
    lr,
    momentum,
    clip,
    HAS_ROWS: tl.constexpr,
    MOMENTUM: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask = _row_block(rows_ptr, width, n_blocks, HAS_ROWS, BLOCK)
    g = _load_grad(grad_ptr, offs, mask, clip, CLIP)  # (BLOCK,)
    if MOMENTUM:
        g = momentum * tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32) + g
        tl.store(buf_ptr + offs, g.to(buf_ptr.dtype.element_ty), mask=mask)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptr + offs, (p - lr * g).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adam_rows_kernel(
    p_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    rows_ptr,
    width,
    n_blocks,
    beta1,
    beta2,
    eps,
    step_size,
    sqrt_c2,
    clip,
    HAS_ROWS: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask = _row_block(rows_ptr, width, n_blocks, HAS_ROWS, BLOCK)
    g = _load_grad(grad_ptr, offs, mask, clip, CLIP)  # (BLOCK,)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp_(g, 1 - beta1)
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta2) * g * g
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_c2) + eps
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptr + offs, (p - step_size * tl.div_rn(m, denom)).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adagrad_rows_kernel(
    p_ptr,
    grad_ptr,
    sum_ptr,
    rows_ptr,
    width,
    n_blocks,
    lr,
    eps,
    clip,
    HAS_ROWS: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask = _row_block(rows_ptr, width, n_blocks, HAS_ROWS, BLOCK)
    g = _load_grad(grad_ptr, offs, mask, clip, CLIP)  # (BLOCK,)
    s = tl.load(sum_ptr + offs, mask=mask, other=0.0).to(tl.float32) + g * g
    tl.store(sum_ptr + offs, s.to(sum_ptr.dtype.element_ty), mask=mask)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptr + offs, (p - lr * tl.div_rn(g, tl.sqrt_rn(s) + eps)).to(p_ptr.dtype.element_ty), mask=mask)


class _Launch(NamedTuple):
    """One row-update launch: ``programs`` = (listed rows) x ``n_blocks`` programs of ``block`` columns each."""

    rows: Tensor  # (r,) int64 rows of p viewed as [n, width]; a placeholder the kernel never reads without has_rows
    has_rows: bool
    width: int
    n_blocks: int
    programs: int
    block: int


def _check(p: Tensor, grad: Tensor, rows: Tensor | None, clip: float | None, state: dict[str, Tensor]) -> None:
    if p.dim() < 1 or not p.is_contiguous() or p.dtype not in DTYPES:
        raise ValueError(
            f"p must be a contiguous float32/float16/bfloat16 tensor of >= 1 dims, got {p.dtype} {tuple(p.shape)}"
            f"{'' if p.is_contiguous() else ' (not contiguous)'}"
        )
    for name, t in {"grad": grad, **state}.items():
        if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device or not t.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous with p's shape {tuple(p.shape)}, dtype {p.dtype} and device {p.device}, "
                f"got {tuple(t.shape)} {t.dtype} on {t.device}"
            )
    if rows is not None and (rows.dim() != 1 or rows.dtype != torch.int64 or rows.device != p.device):
        raise ValueError(f"rows must be an int64 vector on {p.device}, got {rows.dtype} {tuple(rows.shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive (or None), got {clip}")


def _launch(p: Tensor, rows: Tensor | None) -> _Launch | None:
    """The grid for ``rows`` of ``p`` (None: all of ``p`` as one row), or None when there is nothing to update.

    Rows must lie in ``[0, n)`` (not checked on the device).
    """
    if rows is None:
        count, width, rows_arg = 1, p.numel(), p.new_empty(1, dtype=torch.int64)
    else:
        count, width, rows_arg = rows.numel(), p.numel() // p.shape[0], rows.contiguous()
    if count == 0 or width == 0:
        return None
    block = min(MAX_BLOCK, triton.next_power_of_2(width))
    n_blocks = triton.cdiv(width, block)
    return _Launch(rows_arg, rows is not None, width, n_blocks, count * n_blocks, block)


def _clip_arg(clip: float | None) -> float:
    return clip if clip is not None else 0.0  # unread: CLIP is False


def sgd_rows_(
    p: Tensor,
    grad: Tensor,
    rows: Tensor | None,
    lr: float,
    clip: float | None = None,
    momentum: float = 0.0,
    momentum_buffer: Tensor | None = None,
) -> None:
    """SGD on ``rows`` (``[r]`` int64, distinct; None: all) of ``p`` (``[n, ...]``), in place; see the module docstring.

    ``momentum > 0`` needs ``momentum_buffer`` (``p``'s shape), updated in place on the same rows.
    """
    if momentum and momentum_buffer is None:
        raise ValueError("SGD with momentum needs a momentum buffer")
    _check(p, grad, rows, clip, {"momentum_buffer": momentum_buffer} if momentum else {})
    launch = _launch(p, rows)
    if launch is None:
        return
    with launching.on_device(p):
        _sgd_rows_kernel[(launch.programs,)](
            p, grad, momentum_buffer if momentum else p, launch.rows, launch.width, launch.n_blocks,
            lr, momentum, _clip_arg(clip),
            HAS_ROWS=launch.has_rows, MOMENTUM=bool(momentum), CLIP=clip is not None, BLOCK=launch.block,
        )


def adam_rows_(
    p: Tensor,
    grad: Tensor,
    rows: Tensor | None,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    clip: float | None = None,
) -> None:
    """Adam at step ``step`` (1-based, a float) on ``rows`` of ``p``, in place; see the module docstring.

    ``exp_avg`` and ``exp_avg_sq`` (``p``'s shape) are updated on the same rows; other rows keep
    their weights and moments (lazy Adam).
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    _check(p, grad, rows, clip, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq})
    launch = _launch(p, rows)
    if launch is None:
        return
    beta1, beta2 = betas
    # bias corrections in float64 on the host, as torch.optim.Adam computes them from a Python step
    step_size = lr / (1.0 - beta1**step)
    sqrt_c2 = (1.0 - beta2**step) ** 0.5
    with launching.on_device(p):
        _adam_rows_kernel[(launch.programs,)](
            p, grad, exp_avg, exp_avg_sq, launch.rows, launch.width, launch.n_blocks,
            beta1, beta2, eps, step_size, sqrt_c2, _clip_arg(clip),
            HAS_ROWS=launch.has_rows, CLIP=clip is not None, BLOCK=launch.block,
        )


def adagrad_rows_(
    p: Tensor,
    grad: Tensor,
    rows: Tensor | None,
    state_sum: Tensor,
    lr: float,
    eps: float,
    clip: float | None = None,
) -> None:
    """AdaGrad on ``rows`` of ``p``, in place, summing into ``state_sum`` (``p``'s shape); see the module docstring."""
    _check(p, grad, rows, clip, {"state_sum": state_sum})
    launch = _launch(p, rows)
    if launch is None:
        return
    with launching.on_device(p):
        _adagrad_rows_kernel[(launch.programs,)](
            p, grad, state_sum, launch.rows, launch.width, launch.n_blocks, lr, eps, _clip_arg(clip),
            HAS_ROWS=launch.has_rows, CLIP=clip is not None, BLOCK=launch.block,
        )

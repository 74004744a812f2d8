"""What every fast path is tested against: the float64 reference backend, one tolerance table, the
gradients the tests feed in, and the selection invariants.

Test modules import it as ``from reference import ...``: ``tests/`` has no ``__init__.py``, so pytest's
default import mode puts ``tests/`` on ``sys.path`` before it imports a test module (whether one file
or the whole suite is run). Nothing here runs at import beyond building constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mesimp_gpu.backends.check import GradientKind, gradient
from mesimp_gpu.backends.reference import ReferenceBackend
from mesimp_gpu.backends.reference import tolerance as reference_tolerance

#: the reference backend: float64, dense masks, a stable sort (slow and obviously right)
REF = ReferenceBackend()

#: the gpu-marked products at realistic sizes have never run in CI (no CUDA there) and no GPU run has
#: recorded their errors yet, so they keep this factor over the table on atol and rtol: exactly the
#: tolerances they were written with (GPU_TOL: float32 1e-4, float16 2e-2 per sqrt(k)). Set it to 1
#: once a GPU run shows that the table holds there as it does on the CPU.
GPU_MARGIN = 10.0


def tolerance(dtype: torch.dtype, terms: int | None = None, *, gpu: bool = False) -> tuple[float, float]:
    """``(atol, rtol)`` for a result in ``dtype`` against the float64 reference
    (:func:`mesimp_gpu.backends.reference.tolerance`); ``gpu``: a gpu-marked product at realistic size, not
    yet measured on a GPU (:data:`GPU_MARGIN`)."""
    atol, rtol = reference_tolerance(dtype, terms)
    if gpu:
        atol, rtol = atol * GPU_MARGIN, rtol * GPU_MARGIN
    return atol, rtol


def assert_close_to_reference(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype,
    terms: int | None = None,
    msg: str | None = None,
    *,
    gpu: bool = False,
) -> None:
    """``actual`` (a result in ``dtype``; a tensor on any device or a NumPy array) within
    :func:`tolerance` of ``expected`` (any dtype), compared in float64 on the CPU; same shape."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.dtype == dtype, f"the result is {actual.dtype}, the tolerance asked for is {dtype}"
    atol, rtol = tolerance(dtype, terms, gpu=gpu)
    torch.testing.assert_close(
        actual.detach().cpu().double(),
        expected.detach().cpu().double(),
        atol=atol,
        rtol=rtol,
        msg=None if msg is None else (lambda details: f"{msg}\n{details}"),
    )


# ------------------------------------------------------------------------------------------ inputs

def with_ties(g: Tensor) -> Tensor:
    """A copy of ``g`` (``[B, n]``) with ties and zeros planted: row 0 constant magnitude with alternating
    signs, row 1 all zero but its last entry, row 2 a repeated value in every third column."""
    g = g.clone()
    g[0] = torch.where(torch.arange(g.shape[1], device=g.device) % 2 == 0, 0.5, -0.5)
    if g.shape[0] > 1:
        g[1] = 0.0
        g[1, -1] = 2.0
    if g.shape[0] > 2:
        g[2, ::3] = 1.25
    return g


# -------------------------------------------------------------------------------------- invariants


def assert_valid_selection(g: Tensor, idx: Tensor, k: int) -> None:
    """``idx`` is the meProp selection of ``g`` (``[B, n]``), checked from the rule itself (not from a
    backend): ``[B, min(k, n)]`` int64, strictly ascending per row, every kept magnitude >= every dropped
    one, and among equal magnitudes the lower index kept."""
    g, idx = g.detach().cpu(), idx.cpu()
    rows, width = g.shape
    k = min(k, width)
    assert idx.shape == (rows, k) and idx.dtype == torch.int64, (
        f"indices {tuple(idx.shape)} {idx.dtype}, expected ({rows}, {k}) int64"
    )
    assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices must be strictly ascending per row"
    kept = torch.zeros(g.shape, dtype=torch.bool).scatter_(1, idx, True)  # (B, n)
    assert bool((kept.sum(dim=1) == k).all()), f"a row does not keep exactly {k} entries"
    a = g.double().abs()
    low_kept = torch.where(kept, a, math.inf).min(dim=1).values  # (B,): the threshold
    high_dropped = torch.where(kept, -math.inf, a).max(dim=1).values
    assert bool((low_kept >= high_dropped).all()), "a dropped entry outranks a kept one"
    cols = torch.arange(width).expand(rows, width)
    tied = a == low_kept.unsqueeze(1)  # entries at the threshold: kept ones must come first
    last_kept = torch.where(kept & tied, cols, -1).max(dim=1).values
    first_dropped = torch.where(~kept & tied, cols, width).min(dim=1).values
    assert bool((last_kept < first_dropped).all()), "tie order differs from the rule (lower index first)"


# ------------------------------------------------------------------------------------ row updates


def torch_step_on_rows(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    p: Tensor,
    grad: Tensor,
    rows: Tensor | Sequence[int],
    state: dict[str, Tensor],
    step: int,
) -> Tensor:
    """One ``torch.optim`` step (``make([param])``, on the CPU) of ``p[rows]`` from ``state[key][rows]`` at
    step count ``step``: the reference of the row updates. Returns the new rows and writes the new state
    back into ``state``'s rows."""
    twin = torch.nn.Parameter(p[rows].clone())
    opt = make([twin])
    opt.state[twin] = {key: value[rows].clone() for key, value in state.items()}
    opt.state[twin]["step"] = torch.tensor(float(step - 1))  # Adam's and AdaGrad's count before this step
    twin.grad = grad[rows].clone()
    opt.step()
    for key, value in state.items():
        value[rows] = opt.state[twin][key]
    return twin.detach()

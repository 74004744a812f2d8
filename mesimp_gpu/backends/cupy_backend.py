"""The CuPy backend: a CUDA fallback for machines where Triton is unavailable.

The module-level launchers mirror those of :mod:`mesimp_gpu.kernels` (same names, same positional
parameters, torch tensors in and out; the Triton-only tuning keywords ``block_n``, ``fuse`` and ``out``
are left out). Tensors cross to CuPy through DLPack without copies, on torch's current stream, so
in-place updates (``hits``, ``dw``, weights, Adam moments) land in the torch tensors.

The array logic lives in :mod:`mesimp_gpu.backends.cupy_logic` (tested with NumPy in CI); the k-th
largest magnitude per row comes from the radix-select RawKernel ``KTH_LARGEST_SOURCE`` there.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from mesimp_gpu.backends import BackendUnavailable
from mesimp_gpu.backends import cupy_logic as logic
from mesimp_gpu.backends.base import Backend, check_finite, check_k

try:
    import cupy
except ImportError as exc:
    raise BackendUnavailable(f"backend 'cupy' needs the cupy package (pip install mesimp-gpu[cuda]): {exc}") from exc

#: threads per block of the selection kernel (a multiple of the warp size)
KTH_THREADS = 256


@functools.cache
def _kth_kernel() -> Any:
    return cupy.RawKernel(logic.KTH_LARGEST_SOURCE, "kth_largest_abs")


@contextlib.contextmanager
def _torch_stream() -> Iterator[None]:
    """Run CuPy work on torch's current CUDA stream, so both libraries see each other's writes in order."""
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        yield


def _cp(t: Tensor) -> Any:
    if t.device.type != "cuda":
        raise ValueError(f"backend 'cupy' needs CUDA tensors, got one on {t.device}")
    return cupy.from_dlpack(t.detach())


def _kth_largest_abs(g: Any, k: int) -> Any:
    """``[B, 1]`` float32: the ``k``-th largest ``|g[b, :]|`` per row, by the radix-select kernel."""
    g32 = cupy.ascontiguousarray(g, dtype=cupy.float32)
    kth = cupy.empty(g.shape[0], dtype=cupy.float32)
    if g.shape[0]:
        _kth_kernel()((g.shape[0],), (KTH_THREADS,), (g32, kth, cupy.int64(g.shape[1]), cupy.int32(k)))
    return kth[:, None]


def topk_select(g: Tensor, k: int, hits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row-wise top-k of ``|g|`` (``[B, n]``) -> ``(vals [B, k], idx [B, k] int64 ascending)``; ``hits += counts``."""
    if not 1 <= k <= g.shape[1]:
        raise ValueError(f"k must be in [1, {g.shape[1]}], got {k}")
    with _torch_stream():
        gc = _cp(g)
        vals, idx = logic.select_topk(cupy, gc, k, _kth_largest_abs(gc, k))
        if hits is not None:
            logic.add_hits(cupy, _cp(hits), idx)
        return torch.from_dlpack(vals), torch.from_dlpack(idx)


def meprop_dx(vals: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """``dx = G_k @ weight`` (``[B, in]``) from ``vals``/``idx`` ``[B, k]`` and ``weight`` ``[out, in]``."""
    with _torch_stream():
        return torch.from_dlpack(logic.sparse_dx(cupy, _cp(vals), _cp(idx), _cp(weight)))


def topk_dx(g: Tensor, k: int, weight: Tensor, hits: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Selection and ``dx = G_k @ weight`` -> ``(vals [B, k], idx [B, k], dx [B, in])``."""
    vals, idx = topk_select(g, k, hits)
    return vals, idx, meprop_dx(vals, idx, weight)


def meprop_dw(vals: Tensor, idx: Tensor, x: Tensor, out_features: int, dw: Tensor | None = None) -> Tensor:
    """``dW += G_k^T x`` (``[out, in]``, a zero buffer of ``x``'s dtype unless ``dw`` is given), touched rows only."""
    if dw is None:
        dw = torch.zeros(out_features, x.shape[1], dtype=x.dtype, device=x.device)
    with _torch_stream():
        logic.accumulate_dw(cupy, _cp(vals), _cp(idx), _cp(x), _cp(dw))
    return dw


def meprop_sgd_update(vals: Tensor, idx: Tensor, x: Tensor, weight: Tensor, lr: float) -> None:
    """In place ``weight[j] -= lr * (G_k^T x)[j]`` on the touched rows only."""
    with _torch_stream():
        logic.sgd_rows(cupy, _cp(vals), _cp(idx), _cp(x), _cp(weight), lr)


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
    """Lazy Adam on the touched rows of ``weight``, in place; see :func:`mesimp_gpu.kernels.rows.meprop_adam_update`."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    with _torch_stream():
        logic.adam_rows(
            cupy, _cp(vals), _cp(idx), _cp(x), _cp(weight), _cp(exp_avg), _cp(exp_avg_sq), step, lr, betas, eps, clip
        )


def column_scores(g: Tensor) -> Tensor:
    """``s = sum_b |g[b, :]|`` -> ``[out]`` float32."""
    with _torch_stream():
        return torch.from_dlpack(logic.column_scores(cupy, _cp(g)))


def unified_backward(g: Tensor, x: Tensor, weight: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Unified meProp -> ``(dx [B, in], dW [out, in], cols [k] ascending)`` (cuBLAS GEMMs through CuPy)."""
    with _torch_stream():
        scores = logic.column_scores(cupy, _cp(g))[None, :]  # (1, out)
        _, cols = logic.select_topk(cupy, scores, k, _kth_largest_abs(scores, k))
        cols = cols[0]
        dx, dw = logic.unified_products(cupy, _cp(g), _cp(x), _cp(weight), cols)
        return torch.from_dlpack(dx), torch.from_dlpack(dw), torch.from_dlpack(cols)


class CupyBackend(Backend):
    """CuPy launchers behind the :class:`Backend` contract (CUDA tensors only)."""

    name = "cupy"

    def __init__(self) -> None:
        try:
            devices = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise BackendUnavailable(f"backend 'cupy' found no usable CUDA runtime: {exc}") from exc
        if devices == 0 or not torch.cuda.is_available():
            raise BackendUnavailable("backend 'cupy' needs a CUDA device visible to both CuPy and torch (none found)")

    def topk_indices(self, g: Tensor, k: int) -> Tensor:
        check_finite(g)
        return topk_select(g.contiguous(), check_k(k, g.shape[1]))[1]

    def sparse_backward(self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        vals = g.gather(1, idx)  # (B, k)
        return meprop_dx(vals, idx, weight).to(x.dtype), meprop_dw(vals, idx, x, weight.shape[0]).to(weight.dtype)

    def topk_backward(
        self, g: Tensor, x: Tensor, weight: Tensor, k: int, hits: Tensor | None = None, need_dx: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        # dx comes out of the selection kernel itself, so need_dx=False saves nothing here
        check_finite(g)
        vals, idx, dx = topk_dx(g.contiguous(), check_k(k, g.shape[1]), weight, hits)
        return dx.to(x.dtype), meprop_dw(vals, idx, x, weight.shape[0]).to(weight.dtype), idx

    def unified_backward(self, g: Tensor, x: Tensor, weight: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        check_finite(g)
        return unified_backward(g, x, weight, check_k(k, g.shape[1]))

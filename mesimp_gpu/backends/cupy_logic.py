"""Array logic of the CuPy backend, written against an array module ``xp`` (``cupy`` or ``numpy``).

The same functions run on CuPy arrays in :mod:`mesimp_gpu.backends.cupy_backend` and on NumPy
arrays in CI, where no GPU exists. Shapes follow :mod:`mesimp_gpu.backends.base`: ``g`` ``[B, out]``,
``x`` ``[B, in]``, ``weight`` ``[out, in]``, ``vals``/``idx`` ``[B, k]``.

Selection (the shared rule): ``kth[b]`` is the ``k``-th largest ``|g[b, :]|``; entries above it are
kept and entries equal to it fill the remaining slots from the lowest index. ``kth`` is the only
step with two implementations: ``numpy``/``cupy`` ``partition`` here (:func:`kth_largest`), and on
the GPU the radix-select RawKernel :data:`KTH_LARGEST_SOURCE` (one block per row, 31 counting passes
over the float bits, no sort), which the backend passes in as ``kth``.

Products: the kept entries are compacted onto the ``T`` distinct touched columns (``T <= min(out, B k)``):
``Gc`` ``[B, T]``. Then ``dx = Gc @ W[touched]`` and ``D = Gc^T @ x`` (``[T, in]``) are dense GEMMs
(cuBLAS on CuPy: fast and deterministic, no atomics), and ``D`` is added to, or applied to, only the
touched rows, so a dense ``[out, in]`` ``dW`` is built only when the caller asks for one.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

Array = Any  # numpy.ndarray or cupy.ndarray

#: CUDA source of the k-th-largest-magnitude kernel. Grid: one block per row, blockDim a multiple of 32.
#: ``g``: [B, n] float32, ``kth``: [B] float32 (output). For a >= 0 the float bits, read as int, order
#: like the values, so a bitwise binary search (largest t with count(bits >= t) >= k) finds the
#: k-th largest exactly. Counts use integer atomics in shared memory (exact, order independent).
KTH_LARGEST_SOURCE = r"""
extern "C" __global__ void kth_largest_abs(const float* __restrict__ g, float* __restrict__ kth,
                                           const long long n, const int k) {
    __shared__ int count;
    const float* row = g + (long long)blockIdx.x * n;
    int prefix = 0;
    for (int bit = 30; bit >= 0; --bit) {
        const int cand = prefix | (1 << bit);
        if (threadIdx.x == 0) count = 0;
        __syncthreads();
        int local = 0;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            local += (__float_as_int(row[j]) & 0x7fffffff) >= cand;  // |g| bits, subnormals kept
        }
        for (int offset = 16; offset > 0; offset >>= 1) {
            local += __shfl_down_sync(0xffffffffu, local, offset);
        }
        if ((threadIdx.x & 31) == 0) atomicAdd(&count, local);
        __syncthreads();
        if (count >= k) prefix = cand;  // every thread reads the same count
        __syncthreads();                // before thread 0 clears it for the next bit
    }
    if (threadIdx.x == 0) kth[blockIdx.x] = __int_as_float(prefix);
}
"""


def kth_largest(xp: ModuleType, a: Array, k: int) -> Array:
    """``[B, 1]``: the ``k``-th largest entry of each row of ``a`` (``[B, n]``, ``1 <= k <= n``)."""
    n = a.shape[1]
    return xp.partition(a, n - k, axis=1)[:, n - k : n - k + 1]


def select_topk(xp: ModuleType, g: Array, k: int, kth: Array | None = None) -> tuple[Array, Array]:
    """Row-wise top-k of ``|g|`` -> ``(vals [B, k], idx [B, k] int64 ascending)``.

    ``kth`` (``[B, 1]``, same dtype as ``|g|``) may be supplied by a faster kernel; by default it
    comes from :func:`kth_largest`. ``1 <= k <= n`` is the caller's to check.
    """
    a = xp.abs(g)  # (B, n)
    if kth is None:
        kth = kth_largest(xp, a, k)
    above = a > kth  # (B, n)
    equal = a == kth
    free = k - above.sum(axis=1, keepdims=True)  # slots left for ties, >= 1
    keep = above | (equal & (xp.cumsum(equal, axis=1) <= free))
    idx = xp.nonzero(keep)[1].astype(xp.int64).reshape(g.shape[0], k)  # row-major: ascending per row
    return xp.take_along_axis(g, idx, axis=1), idx


def add_hits(xp: ModuleType, hits: Array, idx: Array) -> None:
    """``hits[j] += (occurrences of j in idx)`` in place; ``hits`` is ``[out]`` int64."""
    hits += xp.bincount(idx.reshape(-1), minlength=hits.shape[0]).astype(hits.dtype)


def compact(xp: ModuleType, vals: Array, idx: Array) -> tuple[Array, Array]:
    """``(touched [T] ascending, Gc [B, T])`` with ``Gc[b, t] = G_k[b, touched[t]]``."""
    touched, inverse = xp.unique(idx.reshape(-1), return_inverse=True)
    gc = xp.zeros((idx.shape[0], touched.shape[0]), dtype=vals.dtype)
    rows = xp.repeat(xp.arange(idx.shape[0]), idx.shape[1])
    gc[rows, inverse.reshape(-1)] = vals.reshape(-1)
    return touched, gc


def sparse_dx(xp: ModuleType, vals: Array, idx: Array, weight: Array) -> Array:
    """``dx = G_k @ weight`` -> ``[B, in]``."""
    touched, gc = compact(xp, vals, idx)
    return gc @ weight[touched].astype(gc.dtype, copy=False)


def touched_row_grads(xp: ModuleType, vals: Array, idx: Array, x: Array) -> tuple[Array, Array]:
    """``(touched [T], D [T, in])``: the non-zero rows of ``dW = G_k^T x`` and where they go."""
    touched, gc = compact(xp, vals, idx)
    return touched, gc.T @ x.astype(gc.dtype, copy=False)


def accumulate_dw(xp: ModuleType, vals: Array, idx: Array, x: Array, dw: Array) -> None:
    """``dw += G_k^T x`` in place (``dw`` ``[out, in]``), touching only selected rows."""
    touched, d = touched_row_grads(xp, vals, idx, x)
    dw[touched] += d.astype(dw.dtype, copy=False)


def sgd_rows(xp: ModuleType, vals: Array, idx: Array, x: Array, weight: Array, lr: float) -> None:
    """``weight[j] -= lr * (G_k^T x)[j]`` in place, on touched rows only."""
    touched, d = touched_row_grads(xp, vals, idx, x)
    weight[touched] -= (lr * d).astype(weight.dtype, copy=False)


def adam_rows(
    xp: ModuleType,
    vals: Array,
    idx: Array,
    x: Array,
    weight: Array,
    exp_avg: Array,
    exp_avg_sq: Array,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    clip: float | None,
) -> None:
    """Lazy Adam on the touched rows, in place (formula of :mod:`mesimp_gpu.kernels.rows`)."""
    beta1, beta2 = betas
    touched, d = touched_row_grads(xp, vals, idx, x)
    d = d.astype(exp_avg.dtype, copy=False)
    if clip is not None:
        d = xp.clip(d, -clip, clip)
    m = beta1 * exp_avg[touched] + (1.0 - beta1) * d
    v = beta2 * exp_avg_sq[touched] + (1.0 - beta2) * d * d
    exp_avg[touched] = m
    exp_avg_sq[touched] = v
    step_size = lr / (1.0 - beta1**step)
    inv_sqrt_c2 = 1.0 / math.sqrt(1.0 - beta2**step)
    weight[touched] -= (step_size * m / (xp.sqrt(v) * inv_sqrt_c2 + eps)).astype(weight.dtype, copy=False)


def column_scores(xp: ModuleType, g: Array) -> Array:
    """``s = sum_b |g[b, :]|`` -> ``[out]`` float32 (accumulated in float32)."""
    return xp.abs(g).sum(axis=0, dtype=xp.float32)


def unified_products(xp: ModuleType, g: Array, x: Array, weight: Array, cols: Array) -> tuple[Array, Array]:
    """``dx = g[:, cols] @ weight[cols]`` and ``dW`` (zero outside ``cols``, ``dW[cols] = g[:, cols]^T x``)."""
    g_s = g[:, cols]  # (B, k)
    dx = g_s @ weight[cols]
    dw = xp.zeros_like(weight)
    dw[cols] = g_s.T @ x
    return dx, dw

"""Array logic of the CuPy backend, written against an array module ``xp`` (``cupy`` or ``numpy``).

The same functions run on CuPy arrays in :mod:`mesimp_gpu.backends.cupy_backend` and on NumPy
arrays in CI, where no GPU exists. Shapes follow :mod:`mesimp_gpu.backends.base`: ``g`` ``[B, out]``,
``x`` ``[B, in]``, ``weight`` ``[out, in]``, ``vals``/``idx`` ``[B, k]``.

Selection: the k-th largest ``|g[b, :]|`` per row comes from the radix-select RawKernel
:data:`KTH_LARGEST_SOURCE` (one block per row, 31 counting passes over the float bits, no sort); the
backend hands it to the shared tie-fill of the torch backend
(:func:`mesimp_gpu.backends.torch_backend.threshold_indices`) through DLPack.

Products: the kept entries are compacted onto the ``T`` distinct touched columns (``T <= min(out, B k)``):
``Gc`` ``[B, T]``. Then ``dx = Gc @ W[touched]`` and ``D = Gc^T @ x`` (``[T, in]``) are dense GEMMs
(cuBLAS on CuPy: fast and deterministic, no atomics), and ``D`` is added to only the touched rows of
``dW``.
"""

from __future__ import annotations

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


def accumulate_dw(xp: ModuleType, vals: Array, idx: Array, x: Array, dw: Array) -> None:
    """``dw += G_k^T x`` in place (``dw`` ``[out, in]``), touching only the selected rows."""
    touched, gc = compact(xp, vals, idx)
    d = gc.T @ x.astype(gc.dtype, copy=False)  # (T, in): the non-zero rows of G_k^T x
    dw[touched] += d.astype(dw.dtype, copy=False)


def column_scores(xp: ModuleType, g: Array) -> Array:
    """``s = sum_b |g[b, :]|`` -> ``[out]`` float32 (accumulated in float32)."""
    return xp.abs(g).sum(axis=0, dtype=xp.float32)

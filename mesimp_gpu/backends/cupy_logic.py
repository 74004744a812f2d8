"""Array logic of the CuPy backend, written against an array module ``xp`` (``cupy`` or ``numpy``).

The same functions run on CuPy arrays in :mod:`mesimp_gpu.backends.cupy_backend` and on NumPy
arrays in CI, where no GPU exists. Shapes follow :mod:`mesimp_gpu.backends.base`: ``g`` ``[B, out]``,
``x`` ``[B, in]``, ``weight`` ``[out, in]``, ``vals``/``idx`` ``[B, k]``.

bfloat16: CuPy has no bfloat16 dtype, so such arrays cross from torch as their ``uint16`` bit
patterns (:func:`as_float`, :func:`magnitude_bits` decode them exactly: a bfloat16 is the upper half
of a float32).

Selection, exact for every dtype: ``|g|`` is ranked by its IEEE-754 bit pattern with the sign cleared
(:func:`magnitude_bits`: int32 for float32/float16/bfloat16, widened exactly to float32 first; int64
for float64, so a float64 gradient is ranked at float64 precision, not rounded to float32). For
``a >= 0`` those bits, read as a signed integer, order exactly like the values. The ``k``-th largest
bit pattern per row comes from a bitwise binary search: the radix-select RawKernel
:data:`KTH_LARGEST_SOURCE` on the GPU (one block per row, no sort), :func:`kth_largest_bits` (the same
search, vectorised over rows) in NumPy. The torch backend's tie-fill
(:func:`mesimp_gpu.backends.torch_backend.threshold_indices`) then keeps every entry above it and
fills the remaining slots with the entries equal to it from the lowest index up, comparing the same
integers: exactly ``k`` per row, ties to the lower index.

Products: the kept entries are compacted onto the ``T`` distinct touched columns (``T <= min(out, B k)``):
``Gc`` ``[B, T]``. Then ``dx = Gc @ W[touched]`` and ``D = Gc^T @ x`` (``[T, in]``) are dense GEMMs
(cuBLAS on CuPy: fast and deterministic, no atomics), and ``D`` is added to only the touched rows of
``dW``. Half-precision operands are widened to float32 for the GEMMs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

Array = Any  # numpy.ndarray or cupy.ndarray

#: CUDA source of the k-th-largest-bit-pattern kernels (int32 bits: ``kth_largest_bits32``, int64 bits:
#: ``kth_largest_bits64``). Grid: one block per row, blockDim a multiple of 32. ``bits``: [B, n] (the
#: magnitude bits, >= 0), ``kth``: [B] (output). Bitwise binary search from the top bit: keep a bit
#: when at least k entries are >= the candidate prefix. Counts use integer atomics in shared memory
#: (exact, order independent); the candidate never exceeds the largest positive integer, so nothing wraps.
KTH_LARGEST_SOURCE = r"""
template <typename Bits>
__device__ void kth_largest(const Bits* __restrict__ bits, Bits* __restrict__ kth, const long long n,
                            const int k, const int top_bit) {
    __shared__ int count;
    const Bits* row = bits + (long long)blockIdx.x * n;
    Bits prefix = 0;
    for (int bit = top_bit; bit >= 0; --bit) {
        const Bits cand = prefix | ((Bits)1 << bit);
        if (threadIdx.x == 0) count = 0;
        __syncthreads();
        int local = 0;
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            local += row[j] >= cand;
        }
        for (int offset = 16; offset > 0; offset >>= 1) {
            local += __shfl_down_sync(0xffffffffu, local, offset);
        }
        if ((threadIdx.x & 31) == 0) atomicAdd(&count, local);
        __syncthreads();
        if (count >= k) prefix = cand;  // every thread reads the same count
        __syncthreads();                // before thread 0 clears it for the next bit
    }
    if (threadIdx.x == 0) kth[blockIdx.x] = prefix;
}

extern "C" __global__ void kth_largest_bits32(const int* bits, int* kth, const long long n, const int k) {
    kth_largest<int>(bits, kth, n, k, 30);
}

extern "C" __global__ void kth_largest_bits64(const long long* bits, long long* kth, const long long n,
                                              const int k) {
    kth_largest<long long>(bits, kth, n, k, 62);
}
"""

#: kernel name per bit width
KTH_KERNELS = {32: "kth_largest_bits32", 64: "kth_largest_bits64"}


def as_float(xp: ModuleType, a: Array) -> Array:
    """``a`` as a float array: bfloat16 bit patterns (``uint16``) widened exactly to float32, others unchanged."""
    if a.dtype == xp.uint16:
        return (a.astype(xp.uint32) << 16).view(xp.float32)
    return a


def magnitude_bits(xp: ModuleType, g: Array) -> Array:
    """``|g|`` as ordered integers (same shape): the sign-cleared IEEE-754 bits, int64 for float64,
    int32 for float32, float16 and bfloat16 (``uint16`` bits; both widened exactly to float32 first).

    NaN and inf rank above every finite value (their bits are the largest); the backend rejects them.
    """
    g = as_float(xp, g)
    if g.dtype == xp.float64:
        return g.view(xp.int64) & xp.int64(0x7FFFFFFFFFFFFFFF)
    if g.dtype not in (xp.float32, xp.float16):
        raise TypeError(f"g must be float64, float32, float16 or bfloat16 (uint16 bits), got {g.dtype}")
    return g.astype(xp.float32).view(xp.int32) & xp.int32(0x7FFFFFFF)


def bit_width(bits: Array) -> int:
    """32 or 64: which kernel of :data:`KTH_KERNELS` ranks ``bits``."""
    return 8 * bits.dtype.itemsize


def kth_largest_bits(xp: ModuleType, bits: Array, k: int) -> Array:
    """``[B]``: the ``k``-th largest entry of each row of ``bits`` (``[B, n]``, >= 0), by the kernel's
    bitwise binary search (vectorised over rows here; the GPU runs :data:`KTH_LARGEST_SOURCE`)."""
    prefix = xp.zeros(bits.shape[0], dtype=bits.dtype)
    one = bits.dtype.type(1)
    for bit in range(bit_width(bits) - 2, -1, -1):
        cand = prefix | (one << bits.dtype.type(bit))
        prefix = xp.where((bits >= cand[:, None]).sum(axis=1) >= k, cand, prefix)
    return prefix


def compact(xp: ModuleType, vals: Array, idx: Array) -> tuple[Array, Array]:
    """``(touched [T] ascending, Gc [B, T])`` with ``Gc[b, t] = G_k[b, touched[t]]`` (float32 for half inputs)."""
    vals = as_float(xp, vals)
    if vals.dtype == xp.float16:
        vals = vals.astype(xp.float32)
    touched, inverse = xp.unique(idx.reshape(-1), return_inverse=True)
    gc = xp.zeros((idx.shape[0], touched.shape[0]), dtype=vals.dtype)
    rows = xp.repeat(xp.arange(idx.shape[0]), idx.shape[1])
    gc[rows, inverse.reshape(-1)] = vals.reshape(-1)
    return touched, gc


def sparse_dx(xp: ModuleType, vals: Array, idx: Array, weight: Array) -> Array:
    """``dx = G_k @ weight`` -> ``[B, in]`` (float64 for float64 inputs, else float32)."""
    touched, gc = compact(xp, vals, idx)
    return gc @ as_float(xp, weight[touched]).astype(gc.dtype, copy=False)


def accumulate_dw(xp: ModuleType, vals: Array, idx: Array, x: Array, dw: Array) -> None:
    """``dw += G_k^T x`` in place (``dw`` ``[out, in]``, float64 or float32), touching only the selected rows."""
    touched, gc = compact(xp, vals, idx)
    d = gc.T @ as_float(xp, x).astype(gc.dtype, copy=False)  # (T, in): the non-zero rows of G_k^T x
    dw[touched] += d.astype(dw.dtype, copy=False)


def column_scores(xp: ModuleType, g: Array) -> Array:
    """``s = sum_b |g[b, :]|`` -> ``[out]`` float32 (accumulated in float32)."""
    return xp.abs(as_float(xp, g)).sum(axis=0, dtype=xp.float32)

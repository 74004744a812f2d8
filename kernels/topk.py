"""Row-wise top-k of ``|G|`` by threshold (radix) selection, with optional hit counts and fused ``dx``.

Maths, for every row ``b`` of ``G`` (``[B, n]``) and ``1 <= k <= n``:

1. ``a_j = |G[b, j]|`` as float32. For ``a >= 0`` the IEEE-754 bit pattern, read as a signed int32,
   is ordered exactly like the value, so the ``k``-th largest magnitude ``t`` is found by a bitwise
   binary search on the bits: from the most significant bit down, keep a bit set when at least ``k``
   entries have bits ``>=`` the candidate prefix. 31 passes, no sort, any ``k`` (not only powers of two).
2. Keep every ``j`` with ``a_j > t``, then the entries with ``a_j == t`` from the lowest index up until
   ``k`` are kept. This is the project's selection rule (ties to the lower index, zeros fill rows with
   fewer than ``k`` non-zeros), identical to the float64 reference: magnitudes are compared, never summed.
3. The kept columns are compacted in ascending order (a prefix sum of the keep mask gives each
   its output slot), so ``idx[b]`` is ascending and ``vals[b, s] = G[b, idx[b, s]]``.
4. With ``hits`` (``[n]`` int64), ``hits[j] += 1`` for every kept ``j`` (integer atomics: exact and
   order independent, hence deterministic).
5. Optionally, in the same program, ``dx[b, :] = sum_s vals[b, s] * W[idx[b, s], :]`` (``W``: ``[n, in]``),
   read back from the ``idx``/``vals`` this program has just written (a CTA barrier orders the
   stores before the loads).

Pointers (all contiguous, row-major):

- ``g_ptr``:    ``[B, n]``  float32 / float16 / bfloat16
- ``vals_ptr``: ``[B, k]``  same dtype as ``g``
- ``idx_ptr``:  ``[B, k]``  int64
- ``hits_ptr``: ``[n]``     int64 (only read when ``HAS_HITS``)
- ``w_ptr``:    ``[n, in]`` (only read when ``FUSE_DX``)
- ``dx_ptr``:   ``[B, in]`` (only written when ``FUSE_DX``)

One program per row. A row of up to ``MAX_RESIDENT`` columns is loaded once and stays in registers
for the 31 passes; longer rows are streamed in chunks of ``BLOCK_N`` (re-read from L1/L2 each pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mesimp_gpu.kernels import launch
from mesimp_gpu.kernels.gather import gather_rows_dot, meprop_dx

#: rows up to this width are held in registers during the search; longer rows are streamed
MAX_RESIDENT = 8192
#: chunk width when streaming a long row
STREAM_BLOCK = 2048
#: bits searched: bit 31 (the sign) is always 0 for a magnitude
_TOP_BIT = tl.constexpr(30)


@triton.jit
def _magnitude_bits(g):
    """Bits of ``|g|`` as float32, read as int32 (same shape as ``g``).

    Clearing the sign bit instead of a float ``abs`` keeps subnormals exact even where the
    compiler flushes denormals to zero (the reference ranks them above 0).
    """
    return g.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _abs_bits(row_ptr, cols, n):
    """``|row[cols]|`` as float32 bits in int32, 0 outside ``[0, n)``. Shape of ``cols``."""
    return _magnitude_bits(tl.load(row_ptr + cols, mask=cols < n, other=0.0))


@triton.jit
def _count_ge(
    row_ptr, n, cand, RESIDENT: tl.constexpr, bits_resident, BLOCK_N: tl.constexpr, STRICT: tl.constexpr = False
):
    """Number of entries of the row whose bits are ``>= cand`` (``> cand`` with ``STRICT``); ``cand >= 1``
    (``>= 0`` with ``STRICT``), so the zero padding never counts.

    ``STRICT`` exists because ``cand + 1`` wraps to ``INT_MIN`` in int32 when ``cand = 0x7FFFFFFF``
    (a NaN's magnitude bits, what 0/0 gives on CUDA).
    """
    if RESIDENT:
        above = (bits_resident > cand) if STRICT else (bits_resident >= cand)
        count = tl.sum(above.to(tl.int32), axis=0)
    else:
        per_lane = tl.zeros((BLOCK_N,), dtype=tl.int32)  # (BLOCK_N,)
        for start in range(0, n, BLOCK_N):
            bits = _abs_bits(row_ptr, start + tl.arange(0, BLOCK_N), n)  # (BLOCK_N,)
            per_lane += ((bits > cand) if STRICT else (bits >= cand)).to(tl.int32)
        count = tl.sum(per_lane, axis=0)
    return count


@triton.jit
def _topk_rows_kernel(
    g_ptr,
    vals_ptr,
    idx_ptr,
    hits_ptr,
    w_ptr,
    dx_ptr,
    n,
    k,
    n_in,
    HAS_HITS: tl.constexpr,
    FUSE_DX: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = g_ptr + row * n
    lanes = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    if RESIDENT:
        bits_resident = _abs_bits(row_ptr, lanes, n)  # (BLOCK_N,)
    else:
        bits_resident = lanes  # unused placeholder of the same shape

    # Bitwise binary search for t = the k-th largest bit pattern: the largest t with count(>= t) >= k.
    thresh = tl.zeros((), dtype=tl.int32)
    for bit in range(_TOP_BIT, -1, -1):
        cand = thresh | (1 << bit)
        count = _count_ge(row_ptr, n, cand, RESIDENT, bits_resident, BLOCK_N)
        thresh = tl.where(count >= k, cand, thresh)

    # Slots left for entries equal to t once all strictly larger ones are kept (>= 1): count(>= t)
    # less the ties, never count(>= t + 1), which wraps when t = 0x7FFFFFFF (k NaNs from 0/0 on CUDA).
    free = k - _count_ge(row_ptr, n, thresh, RESIDENT, bits_resident, BLOCK_N, STRICT=True)

    out_row = row * k
    eq_seen = tl.zeros((), dtype=tl.int32)
    written = tl.zeros((), dtype=tl.int32)
    for start in range(0, n, BLOCK_N):
        cols = start + lanes  # (BLOCK_N,)
        valid = cols < n
        g = tl.load(row_ptr + cols, mask=valid, other=0.0)  # (BLOCK_N,)
        bits = _magnitude_bits(g)  # (BLOCK_N,)
        equal = (bits == thresh) & valid
        eq_rank = tl.cumsum(equal.to(tl.int32), axis=0) + eq_seen  # inclusive rank among ties, (BLOCK_N,)
        keep = (bits > thresh) | (equal & (eq_rank <= free))
        slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1 + written  # (BLOCK_N,)
        tl.store(idx_ptr + out_row + slot, cols.to(tl.int64), mask=keep)
        tl.store(vals_ptr + out_row + slot, g, mask=keep)
        if HAS_HITS:
            # counters only: no ordering with other memory is needed
            tl.atomic_add(hits_ptr + cols, tl.full((BLOCK_N,), 1, tl.int64), mask=keep, sem="relaxed")
        eq_seen += tl.sum(equal.to(tl.int32), axis=0)
        written += tl.sum(keep.to(tl.int32), axis=0)

    if FUSE_DX:
        # Other threads of this program wrote idx/vals; order those stores before the loads below.
        tl.debug_barrier()
        for in_start in range(0, n_in, BLOCK_IN):
            in_cols = in_start + tl.arange(0, BLOCK_IN)  # (BLOCK_IN,)
            acc = gather_rows_dot(vals_ptr + out_row, idx_ptr + out_row, k, w_ptr, n_in, in_cols, BLOCK_K, BLOCK_IN)
            tl.store(dx_ptr + row * n_in + in_cols, acc.to(dx_ptr.dtype.element_ty), mask=in_cols < n_in)


def _check_g(g: Tensor, k: int) -> None:
    if g.dim() != 2:
        raise ValueError(f"g must be 2-D [B, n], got shape {tuple(g.shape)}")
    if g.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"g must be float32, float16 or bfloat16, got {g.dtype}")
    if not 1 <= k <= g.shape[1]:
        raise ValueError(f"k must be in [1, {g.shape[1]}], got {k}")


def _check_hits(hits: Tensor | None, g: Tensor) -> None:
    if hits is None:
        return
    if hits.dtype != torch.int64 or hits.shape != (g.shape[1],) or not hits.is_contiguous():
        raise ValueError(f"hits must be a contiguous int64 [{g.shape[1]}] tensor, got {hits.dtype} {tuple(hits.shape)}")
    if hits.device != g.device:
        raise ValueError(f"hits is on {hits.device}, g on {g.device}")


def _select_block(n: int, block_n: int | None) -> tuple[int, bool]:
    """``(BLOCK_N, RESIDENT)`` for a row of ``n``; ``block_n`` forces streaming with that chunk (tests)."""
    if block_n is not None:
        return triton.next_power_of_2(block_n), False
    if n <= MAX_RESIDENT:
        return triton.next_power_of_2(n), True
    return STREAM_BLOCK, False


def _launch(
    g: Tensor,
    k: int,
    hits: Tensor | None,
    weight: Tensor | None,
    block_n: int | None,
    out: tuple[Tensor | None, ...],
) -> tuple[Tensor, Tensor, Tensor | None]:
    g = g.contiguous()
    batch, n = g.shape
    vals = launch.output_buffer(out[0], (batch, k), g.dtype, g.device, "vals")
    idx = launch.output_buffer(out[1], (batch, k), torch.int64, g.device, "idx")
    block, resident = _select_block(n, block_n)
    fuse = weight is not None
    n_in = weight.shape[1] if fuse else 1
    dx = launch.output_buffer(out[2], (batch, n_in), weight.dtype, g.device, "dx") if fuse else None
    if batch:
        with launch.on_device(g):
            _topk_rows_kernel[(batch,)](
                g,
                vals,
                idx,
                hits if hits is not None else idx,
                weight if fuse else g,
                dx if fuse else vals,
                n,
                k,
                n_in,
                HAS_HITS=hits is not None,
                FUSE_DX=fuse,
                RESIDENT=resident,
                BLOCK_N=block,
                BLOCK_K=min(32, triton.next_power_of_2(k)),
                BLOCK_IN=min(128, triton.next_power_of_2(n_in)),
                num_warps=max(4, min(16, block // 512)),  # about 16 row entries per thread when resident
            )
    return vals, idx, dx


def topk_select(
    g: Tensor,
    k: int,
    hits: Tensor | None = None,
    block_n: int | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Row-wise top-k of ``|g|`` (``[B, n]``) -> ``(vals [B, k], idx [B, k] int64 ascending)``.

    ``hits`` (``[n]`` int64), when given, is incremented in place for every kept index.
    ``block_n`` forces the streaming path with chunks of that width (used by tests on tiny rows).
    ``out`` optionally supplies the ``(vals, idx)`` buffers. The caller checks that ``g`` is finite
    (a NaN has no rank).
    """
    _check_g(g, k)
    _check_hits(hits, g)
    vals, idx, _ = _launch(g, k, hits, None, block_n, out or (None, None))
    return vals, idx


def topk_dx(
    g: Tensor,
    k: int,
    weight: Tensor,
    hits: Tensor | None = None,
    fuse: bool | None = None,
    block_n: int | None = None,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Selection and ``dx = G_k @ weight`` -> ``(vals [B, k], idx [B, k], dx [B, in])``.

    ``weight`` is ``[n, in]``. With ``fuse`` the selection kernel also computes ``dx`` (one program
    per row: saves a launch and the re-read of ``idx``, but uses only ``B`` programs); without it a
    separate gather kernel with ``B x ceil(in / BLOCK_IN)`` programs computes ``dx``. The default
    fuses when the batch alone fills the device (``B >=`` the number of SMs, or always off CUDA).
    ``out`` optionally supplies the ``(vals, idx, dx)`` buffers.
    """
    _check_g(g, k)
    _check_hits(hits, g)
    if weight.dim() != 2 or weight.shape[0] != g.shape[1] or weight.device != g.device:
        raise ValueError(
            f"weight must be [{g.shape[1]}, in] on {g.device}, got {tuple(weight.shape)} on {weight.device}"
        )
    weight = weight.contiguous()
    if fuse is None:
        fuse = g.device.type != "cuda" or g.shape[0] >= torch.cuda.get_device_properties(g.device).multi_processor_count
    out = out or (None, None, None)
    if fuse:
        vals, idx, dx = _launch(g, k, hits, weight, block_n, out)
        assert dx is not None
        return vals, idx, dx
    vals, idx, _ = _launch(g, k, hits, None, block_n, out[:2])
    return vals, idx, meprop_dx(vals, idx, weight, out=out[2])

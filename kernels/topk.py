"""Row-wise top-k of ``|G|`` by threshold (radix) selection, with optional hit counts and fused ``dx``.

Maths, for every row ``b`` of ``G`` (``[B, n]``) and ``1 <= k <= n``:

1. ``a_j = |G[b, j]|`` as float32. For ``a >= 0`` the IEEE-754 bit pattern, read as a signed int32,
   is ordered exactly like the value (NaN and inf above every finite value), so the ``k``-th largest
   magnitude ``t`` is found on the bits: a radix search over four 8-bit digits, most significant
   first (bits 30..24, 23..16, 15..8, 7..0). Each pass takes the histogram of the next digit among
   the entries that share the digits found so far, picks the largest digit ``d`` with at least
   ``k_rem`` entries at or above it, and removes the entries strictly above ``d`` from ``k_rem``. After
   four passes ``t`` is exact and ``k_rem`` is the number of entries equal to ``t`` to keep: no sort,
   any ``k`` (not only powers of two), four passes instead of 31 single-bit ones.
2. Keep every ``j`` with ``a_j > t``, then the ``k_rem`` entries with ``a_j == t`` from the lowest index
   up. This is the project's selection rule (ties to the lower index, zeros fill rows with fewer than
   ``k`` non-zeros), identical to the float64 reference: magnitudes are compared, never summed.
3. The kept columns are compacted in ascending order (a prefix sum of the keep mask gives each
   its output slot), so ``idx[b]`` is ascending and ``vals[b, s] = G[b, idx[b, s]]``.
4. With ``hits`` (``[n]`` int64), ``hits[j] += 1`` for every kept ``j`` (integer atomics: exact and
   order independent, hence deterministic).
5. With ``flag`` (``[1]`` int32), a row holding NaN or inf (bits ``>= 0x7F800000``) sets it to 1: the
   caller learns of a non-finite gradient without a host synchronisation, and the row still gets ``k``
   valid indices (ranked by their bits), so nothing downstream reads out of bounds.
6. Optionally, in the same program, ``dx[b, :] = sum_s vals[b, s] * W[idx[b, s], :]`` (``W``: ``[n, in]``),
   read back from the ``idx``/``vals`` this program has just written (a CTA barrier orders the
   stores before the loads).

Wide rows (``n > MAX_RESIDENT``) are read once, in two stages: stage 1 selects the top-``k`` of every
chunk of ``MAX_RESIDENT`` columns (a grid of ``B x chunks`` programs) into a candidate buffer; stage 2
selects the top-``k`` of each row's candidates. Every entry of the row's top-k is also in its chunk's
top-k (its predecessors in the order "larger magnitude, then lower index" within the chunk are among
its fewer than ``k`` predecessors in the row), and the candidates are stored in ascending column
order, so stage 2's "lower position" is "lower column": the result is exactly the one-stage selection.
A chunk narrower than ``k`` keeps all its entries and pads its slots with ``idx = -1``, ``vals = 0``,
which stage 2 ignores. When the candidates would not be much fewer than the row (``k`` large), the row
is streamed instead: every pass re-reads it in chunks of ``STREAM_BLOCK`` (five reads in all).

Pointers (all contiguous, row-major), for a source row of ``n_src`` entries:

- ``src_ptr``:     ``[B, n_src]`` float32 / float16 / bfloat16 (``G``, or stage 1's candidate values)
- ``src_idx_ptr``: ``[B, n_src]`` int64 column of each candidate, -1 for padding (stage 2 only)
- ``vals_ptr``:    ``[B, out_stride]`` same dtype as ``src``; program ``(b, c)`` writes ``k`` slots at ``c * k``
- ``idx_ptr``:     ``[B, out_stride]`` int64
- ``hits_ptr``:    ``[n]`` int64 (only when ``HAS_HITS``)
- ``flag_ptr``:    ``[1]`` int32 (only when ``CHECK``)
- ``w_ptr``:       ``[n, in]`` (only when ``FUSE_DX``)
- ``dx_ptr``:      ``[B, in]`` (only written when ``FUSE_DX``)

Grid: ``(B, ceil(n_src / seg))``; program ``(b, c)`` selects among columns ``[c seg, (c + 1) seg)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mesimp_gpu.kernels import launch
from mesimp_gpu.kernels.gather import gather_rows_dot, meprop_dx

#: rows up to this width are held in registers during the search; a chunk of stage 1 has this width.
#: 4096 lanes over 8 warps compile to at most 80 registers (sm_80, sm_90): 3 blocks per SM; 8192 over
#: 16 warps needs 96-98, one block per SM (tests/test_kernels_compile.py asserts the bound)
MAX_RESIDENT = 4096
#: chunk width when streaming a row whose candidates would not shrink it (k large)
STREAM_BLOCK = 2048
#: lanes of one step of the compaction (two prefix sums), streamed even over a resident row
SCAN_BLOCK = 1024
#: magnitude bits at or above this are inf (0x7F800000) or NaN
_NON_FINITE = tl.constexpr(0x7F800000)
#: fused dx only when the whole input width is one tile of the gather (see :func:`fuse_wins`)
FUSE_MAX_IN = 128
#: rows of W per step of the fused dx
FUSE_BLOCK_K = 16
#: register cap of the fused kernel: left to itself, ptxas holds the 8-warp program at 64 registers and
#: spills on sm_80; 72 compiles without spills on sm_80 and sm_90 and still fits 3 blocks per SM
FUSE_MAX_REGISTERS = 72


@triton.jit
def _magnitude_bits(g):
    """Bits of ``|g|`` as float32, read as int32 (same shape as ``g``).

    Clearing the sign bit instead of a float ``abs`` keeps subnormals exact even where the
    compiler flushes denormals to zero (the reference ranks them above 0).
    """
    return g.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _load_bits(src_row_ptr, src_idx_row_ptr, pos, end, HAS_SRC_IDX: tl.constexpr):
    """``(g, bits, valid)`` of the source entries at positions ``pos`` (``valid``: inside ``[.., end)``
    and, for candidates, not padding). Invalid lanes hold 0 and must be masked by the caller."""
    valid = pos < end
    if HAS_SRC_IDX:
        valid = valid & (tl.load(src_idx_row_ptr + pos, mask=valid, other=-1) >= 0)
    g = tl.load(src_row_ptr + pos, mask=valid, other=0.0)
    return g, _magnitude_bits(g), valid


@triton.jit
def _digit_histogram(bits, valid, prefix, SHIFT: tl.constexpr):
    """Histogram (``(256,)`` int32) of digit ``(bits >> SHIFT) & 255`` over the valid entries whose
    digits above ``SHIFT`` equal ``prefix``'s."""
    if SHIFT == 24:
        match = valid  # bit 31 is 0 for every magnitude: nothing above the first digit
    else:
        match = valid & ((bits >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
    return tl.histogram((bits >> SHIFT) & 255, 256, mask=match)


@triton.jit
def _pick_digit(hist, prefix, k_rem, SHIFT: tl.constexpr):
    """From one pass's histogram: the prefix extended by the largest digit ``d`` with at least ``k_rem``
    entries at or above it, and ``k_rem`` less the entries strictly above ``d``."""
    bins = tl.arange(0, 256)
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # (256,)
    d = tl.max(tl.where(at_or_above >= k_rem, bins, 0), axis=0)
    above = tl.sum(tl.where(bins > d, hist, 0), axis=0)
    return prefix | (d << SHIFT), k_rem - above


@triton.jit
def _pass_histogram(
    src_row_ptr, src_idx_row_ptr, seg_start, seg_end, prefix, bits_resident, valid_resident,
    SHIFT: tl.constexpr, RESIDENT: tl.constexpr, HAS_SRC_IDX: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One pass's digit histogram over the segment: from the registers, or streamed in ``BLOCK_N`` chunks."""
    if RESIDENT:
        hist = _digit_histogram(bits_resident, valid_resident, prefix, SHIFT)
    else:
        hist = tl.zeros((256,), dtype=tl.int32)
        for start in range(seg_start, seg_end, BLOCK_N):
            _, bits, valid = _load_bits(src_row_ptr, src_idx_row_ptr, start + tl.arange(0, BLOCK_N), seg_end,
                                        HAS_SRC_IDX)
            hist += _digit_histogram(bits, valid, prefix, SHIFT)
    return hist


@triton.jit
def _topk_rows_kernel(
    src_ptr,
    src_idx_ptr,
    vals_ptr,
    idx_ptr,
    hits_ptr,
    flag_ptr,
    w_ptr,
    dx_ptr,
    n_src,
    seg,
    k,
    out_stride,
    n_in,
    HAS_SRC_IDX: tl.constexpr,
    HAS_HITS: tl.constexpr,
    CHECK: tl.constexpr,
    FUSE_DX: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    seg_start = chunk * seg
    seg_end = tl.minimum(seg_start + seg, n_src)
    src_row_ptr = src_ptr + row * n_src
    src_idx_row_ptr = src_idx_ptr + row * n_src
    lanes = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    if RESIDENT:
        _, bits_res, valid_res = _load_bits(src_row_ptr, src_idx_row_ptr, seg_start + lanes, seg_end, HAS_SRC_IDX)
        if HAS_SRC_IDX:
            k_seg = k  # the candidates of a row always hold at least k real entries
        else:
            k_seg = tl.minimum(k, seg_end - seg_start)
        if CHECK:
            worst = tl.max(tl.where(valid_res, bits_res, 0), axis=0)
            tl.atomic_max(flag_ptr, 1, mask=worst >= _NON_FINITE, sem="relaxed")
    else:
        bits_res, valid_res = lanes, lanes < 0  # unused placeholders of the same shape
        k_seg = k  # streamed rows are whole rows

    # Radix search for t = the k_seg-th largest bit pattern, and how many entries equal to t to keep.
    prefix = tl.zeros((), dtype=tl.int32)
    k_rem = k_seg
    for shift in tl.static_range(24, -1, -8):  # digits 30..24, 23..16, 15..8, 7..0
        hist = _pass_histogram(src_row_ptr, src_idx_row_ptr, seg_start, seg_end, prefix, bits_res, valid_res,
                               shift, RESIDENT, HAS_SRC_IDX, BLOCK_N)
        prefix, k_rem = _pick_digit(hist, prefix, k_rem, shift)
    thresh = prefix
    free = k_rem  # >= 1

    # Compaction, streamed in SCAN_BLOCK lanes even for a resident row (a re-read from L1/L2): the two
    # prefix sums over the whole row would hold several registers per entry at once.
    out_row = row * out_stride + chunk * k
    scan_lanes = tl.arange(0, SCAN_BLOCK)  # (SCAN_BLOCK,)
    eq_seen = tl.zeros((), dtype=tl.int32)
    written = tl.zeros((), dtype=tl.int32)
    bad = tl.zeros((), dtype=tl.int32)
    for start in range(seg_start, seg_end, SCAN_BLOCK):
        pos = start + scan_lanes
        g, bits, valid = _load_bits(src_row_ptr, src_idx_row_ptr, pos, seg_end, HAS_SRC_IDX)
        if CHECK and not RESIDENT:
            bad = tl.maximum(bad, tl.max(tl.where(valid, bits, 0), axis=0))
        equal = (bits == thresh) & valid
        eq_rank = tl.cumsum(equal.to(tl.int32), axis=0) + eq_seen  # inclusive rank among ties, (SCAN_BLOCK,)
        keep = ((bits > thresh) & valid) | (equal & (eq_rank <= free))
        slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1 + written  # (SCAN_BLOCK,)
        if HAS_SRC_IDX:
            cols = tl.load(src_idx_row_ptr + pos, mask=keep, other=0)  # (SCAN_BLOCK,) int64
        else:
            cols = pos.to(tl.int64)
        tl.store(idx_ptr + out_row + slot, cols, mask=keep)
        tl.store(vals_ptr + out_row + slot, g, mask=keep)
        if HAS_HITS:
            # counters only: no ordering with other memory is needed
            tl.atomic_add(hits_ptr + cols, tl.full((SCAN_BLOCK,), 1, tl.int64), mask=keep, sem="relaxed")
        eq_seen += tl.sum(equal.to(tl.int32), axis=0)
        written += tl.sum(keep.to(tl.int32), axis=0)
    if CHECK and not RESIDENT:
        tl.atomic_max(flag_ptr, 1, mask=bad >= _NON_FINITE, sem="relaxed")
    # a chunk narrower than k pads its slots (stage 1 only): stage 2 skips idx -1
    for pad_start in range(k_seg, k, BLOCK_N):
        pad = pad_start + lanes
        tl.store(idx_ptr + out_row + pad, tl.full((BLOCK_N,), -1, tl.int64), mask=pad < k)
        tl.store(vals_ptr + out_row + pad, tl.zeros((BLOCK_N,), dtype=vals_ptr.dtype.element_ty), mask=pad < k)

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


def _check_aux(name: str, t: Tensor | None, dtype: torch.dtype, shape: tuple[int, ...], g: Tensor) -> None:
    if t is None:
        return
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} {list(shape)} tensor, got {t.dtype} {tuple(t.shape)}")
    if t.device != g.device:
        raise ValueError(f"{name} is on {t.device}, g on {g.device}")


def num_warps(block: int) -> int:
    """Warps of a selection program over ``block`` lanes: about 16 lanes per thread, 4 to 16 warps."""
    return max(4, min(16, block // 512))


class Plan(NamedTuple):
    """How a row of ``n`` is selected: one resident or streamed pass, or two stages of ``chunk`` columns."""

    two_stage: bool
    chunk: int  # stage 1's chunk width (two stages), else n
    block: int  # BLOCK_N of the (last) selection
    resident: bool  # the (last) selection holds its row in registers


def plan(n: int, k: int, block_n: int | None = None, chunk: int | None = None) -> Plan:
    """The selection plan for rows of ``n`` and ``k``; ``block_n`` forces streaming with that chunk,
    ``chunk`` forces two stages with that chunk width (both for tests on tiny rows)."""
    if chunk is None and block_n is None and n > MAX_RESIDENT:
        candidates = triton.cdiv(n, MAX_RESIDENT) * k
        if 2 * candidates <= n:  # stage 2 reads at most half of what a streamed pass re-reads five times
            chunk = MAX_RESIDENT
    if chunk is not None:
        width = triton.cdiv(n, chunk) * k
        resident = block_n is None and width <= MAX_RESIDENT
        block = triton.next_power_of_2(block_n if block_n is not None else (width if resident else STREAM_BLOCK))
        return Plan(True, chunk, block, resident)
    if block_n is not None:
        return Plan(False, n, triton.next_power_of_2(block_n), False)
    if n <= MAX_RESIDENT:
        return Plan(False, n, triton.next_power_of_2(n), True)
    return Plan(False, n, STREAM_BLOCK, False)


def fuse_wins(n: int, k: int, n_in: int) -> bool:
    """Whether the fused selection + ``dx`` kernel beats selection then the gather kernel.

    The fused kernel computes ``dx`` with the selection's ``B`` programs of up to 16 warps; the gather
    kernel launches ``B x ceil(in / 128)`` programs of 4 warps that fill the device and never wait on a
    barrier. Fusing saves one launch and the re-read of ``idx``/``vals`` (``12 B k`` bytes), which only
    outweighs the lost parallelism when the gather would launch the same ``B`` programs anyway: when
    ``in`` is a single tile (``in <= FUSE_MAX_IN``) and the row is selected in one resident pass.
    """
    p = plan(n, k)
    return not p.two_stage and p.resident and n_in <= FUSE_MAX_IN


def _select(
    src: Tensor,
    src_idx: Tensor | None,
    k: int,
    seg: int,
    block: int,
    resident: bool,
    hits: Tensor | None,
    flag: Tensor | None,
    weight: Tensor | None,
    vals: Tensor,
    idx: Tensor,
    dx: Tensor | None,
) -> None:
    """One launch of the selection kernel over ``src`` (``[B, n_src]``) in segments of ``seg``."""
    batch, n_src = src.shape
    segments = triton.cdiv(n_src, seg)
    n_in = weight.shape[1] if weight is not None else 1
    with launch.on_device(src):
        _topk_rows_kernel[(batch, segments)](
            src,
            src_idx if src_idx is not None else idx,
            vals,
            idx,
            hits if hits is not None else idx,
            flag if flag is not None else idx,
            weight if weight is not None else src,
            dx if dx is not None else vals,
            n_src,
            seg,
            k,
            vals.shape[1],
            n_in,
            HAS_SRC_IDX=src_idx is not None,
            HAS_HITS=hits is not None,
            CHECK=flag is not None,
            FUSE_DX=weight is not None,
            RESIDENT=resident,
            BLOCK_N=block,
            SCAN_BLOCK=min(block, SCAN_BLOCK),
            BLOCK_K=min(FUSE_BLOCK_K, triton.next_power_of_2(k)),
            BLOCK_IN=min(FUSE_MAX_IN, triton.next_power_of_2(n_in)),
            num_warps=num_warps(block),
            **({"maxnreg": FUSE_MAX_REGISTERS} if weight is not None else {}),
        )


def _launch(
    g: Tensor,
    k: int,
    hits: Tensor | None,
    flag: Tensor | None,
    weight: Tensor | None,
    block_n: int | None,
    chunk: int | None,
    out: tuple[Tensor | None, ...],
) -> tuple[Tensor, Tensor, Tensor | None]:
    g = g.contiguous()
    batch, n = g.shape
    vals = launch.output_buffer(out[0], (batch, k), g.dtype, g.device, "vals")
    idx = launch.output_buffer(out[1], (batch, k), torch.int64, g.device, "idx")
    dx = None
    if weight is not None:
        dx = launch.output_buffer(out[2], (batch, weight.shape[1]), weight.dtype, g.device, "dx")
    if not batch:
        return vals, idx, dx
    p = plan(n, k, block_n, chunk)
    if p.two_stage:
        if weight is not None:
            raise ValueError("the fused dx runs with one-stage selections only (see fuse_wins)")
        width = triton.cdiv(n, p.chunk) * k
        cand_vals = torch.empty(batch, width, dtype=g.dtype, device=g.device)
        cand_idx = torch.empty(batch, width, dtype=torch.int64, device=g.device)
        stage1_block = triton.next_power_of_2(p.chunk)
        _select(g, None, k, p.chunk, stage1_block, True, None, flag, None, cand_vals, cand_idx, None)
        _select(cand_vals, cand_idx, k, width, p.block, p.resident, hits, None, None, vals, idx, None)
    else:
        _select(g, None, k, n, p.block, p.resident, hits, flag, weight, vals, idx, dx)
    return vals, idx, dx


def topk_select(
    g: Tensor,
    k: int,
    hits: Tensor | None = None,
    flag: Tensor | None = None,
    block_n: int | None = None,
    chunk: int | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Row-wise top-k of ``|g|`` (``[B, n]``) -> ``(vals [B, k], idx [B, k] int64 ascending)``.

    ``hits`` (``[n]`` int64), when given, is incremented in place for every kept index. ``flag``
    (``[1]`` int32), when given, is set to 1 when ``g`` holds NaN or inf (such rows are ranked by
    their bits, NaN and inf above every finite value, and still get ``k`` valid indices).
    ``block_n`` forces the streamed path with chunks of that width, ``chunk`` the two-stage path with
    chunks of that width (both for tests on tiny rows). ``out`` optionally supplies the ``(vals, idx)``
    buffers.
    """
    _check_g(g, k)
    _check_aux("hits", hits, torch.int64, (g.shape[1],), g)
    _check_aux("flag", flag, torch.int32, (1,), g)
    vals, idx, _ = _launch(g, k, hits, flag, None, block_n, chunk, out or (None, None))
    return vals, idx


def topk_dx(
    g: Tensor,
    k: int,
    weight: Tensor,
    hits: Tensor | None = None,
    flag: Tensor | None = None,
    fuse: bool | None = None,
    block_n: int | None = None,
    chunk: int | None = None,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Selection and ``dx = G_k @ weight`` -> ``(vals [B, k], idx [B, k], dx [B, in])``.

    ``weight`` is ``[n, in]``. With ``fuse`` the selection kernel also computes ``dx`` (one program per
    row); without it the gather kernel (``B x ceil(in / 128)`` programs) does. The default is
    :func:`fuse_wins`. ``hits``, ``flag``, ``block_n``, ``chunk``: as in :func:`topk_select` (``fuse``
    needs a one-stage selection). ``out`` optionally supplies the ``(vals, idx, dx)`` buffers.
    """
    _check_g(g, k)
    _check_aux("hits", hits, torch.int64, (g.shape[1],), g)
    _check_aux("flag", flag, torch.int32, (1,), g)
    if weight.dim() != 2 or weight.shape[0] != g.shape[1] or weight.device != g.device:
        raise ValueError(
            f"weight must be [{g.shape[1]}, in] on {g.device}, got {tuple(weight.shape)} on {weight.device}"
        )
    weight = weight.contiguous()
    if fuse is None:
        fuse = chunk is None and block_n is None and fuse_wins(g.shape[1], k, weight.shape[1])
    out = out or (None, None, None)
    if fuse:
        vals, idx, dx = _launch(g, k, hits, flag, weight, block_n, chunk, out)
        assert dx is not None
        return vals, idx, dx
    vals, idx, _ = _launch(g, k, hits, flag, None, block_n, chunk, out[:2])
    return vals, idx, meprop_dx(vals, idx, weight, out=out[2])

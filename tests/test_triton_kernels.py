"""Triton kernels and the Triton backend against the float64 reference backend.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (``conftest`` sets
``TRITON_INTERPRET=1``), so shapes stay tiny; with CUDA the same tests run on the GPU, and the
``gpu``-marked tests at the end add realistic sizes. Outputs are poisoned (NaN / -1) before the
kernels run, so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton")

from mesimp_gpu.backends import BackendUnavailable, get_backend  # noqa: E402
from mesimp_gpu.backends.base import InvalidGradientError  # noqa: E402
from mesimp_gpu.kernels import gather, launch, row_updates, rows, topk, unified  # noqa: E402
from mesimp_gpu.kernels.gather import meprop_dx  # noqa: E402
from mesimp_gpu.kernels.row_updates import adagrad_rows_, adam_rows_, sgd_rows_  # noqa: E402
from mesimp_gpu.kernels.rows import meprop_dw  # noqa: E402
from mesimp_gpu.kernels.topk import topk_dx, topk_select  # noqa: E402
from mesimp_gpu.kernels.unified import column_scores  # noqa: E402
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode, random_indices  # noqa: E402
from reference import (  # noqa: E402
    REF,
    assert_close_to_reference,
    assert_valid_selection,
    gradient,
    tolerance,
    torch_step_on_rows,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32 = torch.float32


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=DEVICE)


# (rows, cols, k, block_n, chunk): block_n forces the streamed path with chunks smaller than the row,
# chunk the two-stage path (per-chunk top-k, then the top-k of the candidates) with chunks of that width
SELECT_SHAPES = [
    (1, 1, 1, None, None),
    (1, 37, 5, None, None),
    (5, 37, 1, None, None),
    (5, 37, 7, None, None),
    (5, 37, 37, None, None),
    (16, 128, 20, None, None),
    (2, 4999, 37, None, None),
    (4, 100, 33, 32, None),
    (3, 37, 7, 8, None),
    (3, 37, 37, 8, None),
    (5, 37, 7, None, 8),  # chunks narrower than k: padded candidates
    (5, 37, 1, None, 16),
    (3, 37, 37, None, 16),  # k = n: every candidate kept
    (4, 100, 9, 16, 32),  # two stages, the second streamed
    (2, 4999, 5, None, 1024),
]


def test_plan_reads_wide_rows_once() -> None:
    """Rows wider than the resident limit take two stages unless k is too large for them to pay."""
    assert topk.plan(topk.MAX_RESIDENT, 32) == topk.Plan(False, topk.MAX_RESIDENT, topk.MAX_RESIDENT, True)
    assert topk.plan(topk.MAX_RESIDENT + 1, 32) == topk.Plan(True, topk.MAX_RESIDENT, 64, True)
    wide = topk.plan(20 * topk.MAX_RESIDENT, 32)
    assert wide.two_stage and wide.chunk == topk.MAX_RESIDENT and wide.resident and wide.block == 1024
    assert topk.plan(200 * topk.MAX_RESIDENT, 32) == topk.Plan(True, topk.MAX_RESIDENT, topk.STREAM_BLOCK, False)
    streamed = topk.plan(5 * topk.MAX_RESIDENT, 2 * topk.MAX_RESIDENT)
    assert not streamed.two_stage and not streamed.resident
    # the fused dx only where the gather kernel would launch the same B programs: one input tile
    assert topk.fuse_wins(topk.MAX_RESIDENT, 32, topk.FUSE_MAX_IN)
    assert not topk.fuse_wins(topk.MAX_RESIDENT, 32, topk.FUSE_MAX_IN + 1)
    assert not topk.fuse_wins(2 * topk.MAX_RESIDENT, 32, 64)  # two stages: no fusion


@pytest.mark.parametrize("kind", ["random", "ties", "sparse", "tiny"])
@pytest.mark.parametrize(("rows", "cols", "k", "block_n", "chunk"), SELECT_SHAPES)
def test_topk_select_matches_reference(
    seed: int, rows: int, cols: int, k: int, block_n: int | None, chunk: int | None, kind: str
) -> None:
    g = gradient(rows, cols, kind, device=DEVICE)
    hits0 = torch.randint(0, 5, (cols,), device=DEVICE)
    hits = hits0.clone()
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = (poisoned((rows, k), g.dtype), poisoned((rows, k), torch.int64))
    vals, idx = topk_select(g, k, hits=hits, flag=flag, block_n=block_n, chunk=chunk, out=out)
    expected = REF.topk_indices(g.cpu(), k)
    assert torch.equal(idx.cpu(), expected)
    assert torch.equal(vals.cpu(), g.cpu().gather(1, expected))
    assert torch.equal(hits.cpu(), hits0.cpu() + torch.bincount(expected.reshape(-1), minlength=cols))
    assert int(flag) == 0


@pytest.mark.parametrize("draw", range(4))
def test_random_shapes_match_reference(seed: int, draw: int) -> None:
    """Shapes, k, kind and selection path drawn from the seed: selection, hits, dx (fused or not), dW and
    the column scores against the reference."""
    gen = torch.Generator().manual_seed(seed * 101 + draw)

    def pick(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    rows, cols, n_in = pick(1, 6), pick(1, 300), pick(1, 150)
    k = [1, cols, pick(1, cols)][pick(0, 2)]
    kind = ["random", "ties", "sparse", "tiny"][pick(0, 3)]
    path = pick(0, 2)  # default, streamed, two stages
    block_n = pick(8, 64) if path == 1 else None
    chunk = pick(4, 64) if path == 2 else None
    g = gradient(rows, cols, kind, device=DEVICE)
    weight, x = torch.randn(cols, n_in, device=DEVICE), torch.randn(rows, n_in, device=DEVICE)
    hits = torch.zeros(cols, dtype=torch.int64, device=DEVICE)
    fuse = path == 0 and bool(pick(0, 1))
    msg = f"B={rows} n={cols} in={n_in} k={k} {kind} block_n={block_n} chunk={chunk} fuse={fuse}"
    vals, idx, dx = topk_dx(g, k, weight, hits=hits, fuse=fuse, block_n=block_n, chunk=chunk)
    expected = REF.topk_indices(g.cpu(), k)
    assert torch.equal(idx.cpu(), expected), msg
    assert torch.equal(vals.cpu(), g.cpu().gather(1, expected)), msg
    assert torch.equal(hits.cpu(), torch.bincount(expected.reshape(-1), minlength=cols)), msg
    edx, edw = REF.sparse_backward(g.cpu(), expected, x.cpu(), weight.cpu())
    assert_close_to_reference(dx, edx, F32, terms=k, msg=msg)
    assert_close_to_reference(meprop_dw(vals, idx, x, cols, out=poisoned((cols, n_in), F32)), edw, F32, terms=rows,
                              msg=msg)
    assert_close_to_reference(column_scores(g), g.cpu().double().abs().sum(dim=0), F32, terms=rows, msg=msg)


def magnitude_bits(g: Tensor) -> Tensor:
    """``|g|`` as float32 bit patterns (``[B, n]`` int64): how the kernels rank, NaN and inf included."""
    return (g.float().view(torch.int32) & 0x7FFFFFFF).long()


@pytest.mark.parametrize(("block_n", "chunk"), [(None, None), (16, None), (None, 8)])
@pytest.mark.parametrize("payload", [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800000])
def test_topk_select_non_finite_rows_write_every_slot(
    seed: int, payload: int, block_n: int | None, chunk: int | None
) -> None:
    """Rows with at least ``k`` NaNs or infs (0x7FFFFFFF is what 0/0 gives on CUDA) still get ``k`` valid
    indices, ranked by their magnitude bits (the threshold ``0x7FFFFFFF`` must not wrap in int32), and
    the device flag reports them; a finite gradient leaves the flag clear."""
    rows, cols, k = 4, 37, 5
    g = gradient(rows, cols, "random")
    special = torch.tensor(payload - (1 << 32) if payload >= 1 << 31 else payload, dtype=torch.int32).view(F32)
    g[0, 3:3 + k] = special  # exactly k
    g[1, ::2] = special  # more than k
    g[2, 7] = special  # fewer than k
    g = g.to(DEVICE)
    out = (poisoned((rows, k), g.dtype), poisoned((rows, k), torch.int64))
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    vals, idx = topk_select(g, k, flag=flag, block_n=block_n, chunk=chunk, out=out)
    expected = REF.topk_indices(magnitude_bits(g.cpu()).double(), k)  # bits below 2^31: exact in float64
    assert torch.equal(idx.cpu(), expected)
    assert torch.equal(vals.cpu().view(torch.int32), g.cpu().gather(1, expected).view(torch.int32))
    assert int(flag) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_select_half_precision(seed: int, dtype: torch.dtype) -> None:
    g = gradient(6, 45, "random", dtype, device=DEVICE)
    vals, idx = topk_select(g, 9)
    expected = REF.topk_indices(g.cpu(), 9)
    assert torch.equal(idx.cpu(), expected)
    assert torch.equal(vals.cpu(), g.cpu().gather(1, expected))


def test_topk_select_invariants(seed: int) -> None:
    """Exactly ``k`` distinct ascending indices, every kept magnitude >= every dropped one, ties to the lower index."""
    g = gradient(8, 50, "ties", device=DEVICE)
    _, idx = topk_select(g, 13)
    assert_valid_selection(g, idx, 13)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize(
    ("rows", "cols", "n_in", "k", "block_n"), [(5, 37, 20, 7, None), (1, 16, 3, 16, None), (4, 40, 130, 9, 16)]
)
def test_topk_dx_matches_reference(
    seed: int, rows: int, cols: int, n_in: int, k: int, block_n: int | None, fuse: bool
) -> None:
    g = gradient(rows, cols, "random", device=DEVICE)
    weight = torch.randn(cols, n_in, device=DEVICE)
    hits = torch.zeros(cols, dtype=torch.int64, device=DEVICE)
    out = (poisoned((rows, k), g.dtype), poisoned((rows, k), torch.int64), poisoned((rows, n_in), weight.dtype))
    vals, idx, dx = topk_dx(g, k, weight, hits=hits, fuse=fuse, block_n=block_n, out=out)
    expected_idx = REF.topk_indices(g.cpu(), k)
    assert torch.equal(idx.cpu(), expected_idx)
    assert torch.equal(vals.cpu(), g.cpu().gather(1, expected_idx))
    assert torch.equal(hits.cpu(), torch.bincount(expected_idx.reshape(-1), minlength=cols))
    expected_dx, _ = REF.sparse_backward(g.cpu(), expected_idx, torch.zeros(rows, n_in), weight.cpu())
    assert_close_to_reference(dx, expected_dx, F32)


@pytest.mark.parametrize(("rows", "cols", "n_in", "k"), [(5, 37, 20, 7), (1, 9, 1, 9), (3, 70, 129, 33)])
def test_meprop_dx_given_indices(seed: int, rows: int, cols: int, n_in: int, k: int) -> None:
    g = gradient(rows, cols, "random", device=DEVICE)
    weight = torch.randn(cols, n_in, device=DEVICE)
    idx = random_indices(rows, cols, k, DEVICE)
    dx = meprop_dx(g.gather(1, idx), idx, weight, out=poisoned((rows, n_in), weight.dtype))
    expected, _ = REF.sparse_backward(g.cpu(), idx.cpu(), torch.zeros(rows, n_in), weight.cpu())
    assert_close_to_reference(dx, expected, F32)


@pytest.mark.parametrize(
    ("rows", "cols", "n_in", "k"), [(5, 37, 20, 7), (1, 9, 3, 9), (16, 40, 130, 5), (3, 11, 600, 2), (8, 5, 7, 5)]
)
def test_meprop_dw_writes_or_accumulates_deterministically(seed: int, rows: int, cols: int, n_in: int, k: int) -> None:
    """Write-only (into a poisoned buffer: untouched rows must be written as zeros) and accumulate modes;
    n_in = 600 spans several column tiles per program, (8, 5, 7, 5) makes every column hot."""
    g = gradient(rows, cols, "random", device=DEVICE)
    x = torch.randn(rows, n_in, device=DEVICE)
    idx = random_indices(rows, cols, k, DEVICE)
    vals = g.gather(1, idx)
    _, expected = REF.sparse_backward(g.cpu(), idx.cpu(), x.cpu(), torch.zeros(cols, n_in))
    written = meprop_dw(vals, idx, x, cols, out=poisoned((cols, n_in), x.dtype))
    assert_close_to_reference(written, expected, F32)
    untouched = torch.ones(cols, dtype=torch.bool).index_fill_(0, idx.cpu().reshape(-1), False)
    assert torch.equal(written.cpu()[untouched], torch.zeros(int(untouched.sum()), n_in))
    start = torch.randn(cols, n_in, device=DEVICE)
    dw = meprop_dw(vals, idx, x, cols, dw=start.clone())
    assert_close_to_reference(dw, start.cpu().double() + expected.double(), F32)
    assert torch.equal(dw.cpu()[untouched], start.cpu()[untouched])
    fresh = meprop_dw(vals, idx, x, cols)
    assert torch.equal(fresh, written)
    assert torch.equal(meprop_dw(vals, idx, x, cols), fresh), "dW is not bitwise reproducible"


@pytest.mark.parametrize(("rows", "cols"), [(13, 70), (1, 1), (300, 9), (257, 130)])
def test_column_scores_match_reference(seed: int, rows: int, cols: int) -> None:
    """One program or several row partitions per column block (300 and 257 rows), odd widths."""
    g = gradient(rows, cols, "random", device=DEVICE)
    scores = column_scores(g, out=poisoned((cols,), torch.float32))
    assert_close_to_reference(scores, g.cpu().double().abs().sum(dim=0), F32, terms=rows)
    assert torch.equal(column_scores(g), scores), "column scores are not bitwise reproducible"


class _GuardWatch:
    """Stands in for :func:`mesimp_gpu.kernels.launch.on_device` and for every ``*_kernel`` of the kernel
    modules: records, for each launch, the devices whose guard was entered around it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active: list[torch.device] = []
        self.launches: list[tuple[str, list[torch.device]]] = []
        monkeypatch.setattr(launch, "on_device", self.on_device)
        for module in (gather, row_updates, rows, topk, unified):
            for name in [n for n in vars(module) if n.endswith("_kernel") and n.startswith("_")]:
                monkeypatch.setattr(module, name, self.watched(name, getattr(module, name)))

    @contextlib.contextmanager
    def _entered(self, device: torch.device) -> Iterator[None]:
        self.active.append(device)
        try:
            yield
        finally:
            self.active.pop()

    def on_device(self, t: Tensor) -> contextlib.AbstractContextManager[None]:
        return self._entered(t.device)

    def watched(self, name: str, kernel):
        watch = self

        class Watched:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    watch.launches.append((name, list(watch.active)))
                    return kernel[grid](*args, **kwargs)

                return run

        return Watched()


def test_every_launch_runs_under_its_tensors_device_guard(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current device, not the tensors': each launcher must enter the guard of
    its tensors' device around every launch (on CUDA the guard is ``torch.cuda.device``)."""
    watch = _GuardWatch(monkeypatch)
    g = gradient(3, 20, "random", device=DEVICE)
    weight, x = torch.randn(20, 6, device=DEVICE), torch.randn(3, 6, device=DEVICE)
    vals, idx = topk_select(g, 4)
    for fuse in (True, False):
        topk_dx(g, 4, weight, fuse=fuse)
    meprop_dx(vals, idx, weight)
    meprop_dw(vals, idx, x, 20)
    column_scores(g)
    p, grad = torch.randn(5, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    rows_sel = torch.tensor([0, 3], device=DEVICE)
    sgd_rows_(p, grad, rows_sel, 0.1)
    adam_rows_(p, grad, rows_sel, torch.zeros_like(p), torch.zeros_like(p), 1.0, 0.01, (0.9, 0.999), 1e-8)
    adagrad_rows_(p, grad, rows_sel, torch.zeros_like(p), 0.1, 1e-6)
    launched = {name for name, _ in watch.launches}
    kernels = {n for m in (gather, row_updates, rows, topk, unified) for n in vars(m) if n.endswith("_kernel")}
    assert launched == kernels, f"kernels this test does not launch: {kernels - launched}"
    for name, active in watch.launches:
        assert active and active[-1] == g.device, f"{name} launched outside its tensors' device guard"


# ------------------------------------------------------------------------------------ row updates


#: name -> (launcher for (p, grad, rows, state tensors, step, clip), torch.optim twin, state keys)
ROW_UPDATES = {
    "sgd": (lambda p, g, rows, st, t, clip: sgd_rows_(p, g, rows, 0.1, clip),
            lambda ps: torch.optim.SGD(ps, lr=0.1), ()),
    "sgd-momentum": (lambda p, g, rows, st, t, clip: sgd_rows_(p, g, rows, 0.1, clip, 0.9, st["momentum_buffer"]),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), ("momentum_buffer",)),
    "adam": (lambda p, g, rows, st, t, clip: adam_rows_(p, g, rows, st["exp_avg"], st["exp_avg_sq"], float(t), 0.01,
                                                         (0.9, 0.999), 1e-8, clip),
             lambda ps: torch.optim.Adam(ps, lr=0.01), ("exp_avg", "exp_avg_sq")),
    "adagrad": (lambda p, g, rows, st, t, clip: adagrad_rows_(p, g, rows, st["sum"], 0.1, 1e-6, clip),
                lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-6), ("sum",)),
}


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("shape", [(13, 7), (16, 128), (5, 1), (6, 3, 5)])
@pytest.mark.parametrize("name", list(ROW_UPDATES))
def test_row_updates_step_like_torch_optim(seed: int, name: str, shape: tuple[int, ...], clip: float | None) -> None:
    """Several steps, other rows each (an empty set, then all rows as ``None`` too): listed rows move as
    torch.optim moves them from their own state; every other row keeps its weights and state."""
    launch, make_torch, keys = ROW_UPDATES[name]
    n = shape[0]
    p = torch.randn(shape, device=DEVICE)
    state = {key: torch.zeros(shape, device=DEVICE) for key in keys}
    expected, expected_state = p.cpu().clone(), {key: value.cpu().clone() for key, value in state.items()}
    all_rows = torch.arange(n)
    for step, rows in enumerate(
        (torch.randperm(n)[: n // 2 + 1].sort().values, torch.tensor([n - 1]), torch.zeros(0, dtype=torch.long),
         None, torch.randperm(n)[: max(1, n // 3)].sort().values),
        start=1,
    ):
        grad = torch.randn(shape) * 2
        listed = all_rows if rows is None else rows
        twin_grad = grad if clip is None else grad.clamp(-clip, clip)
        if listed.numel():
            expected[listed] = torch_step_on_rows(make_torch, expected, twin_grad, listed, expected_state, step)
        launch(p, grad.to(DEVICE), None if rows is None else rows.to(DEVICE), state, step, clip)
        assert_close_to_reference(p, expected, F32)  # against torch.optim's float32 step
        for key in keys:
            assert_close_to_reference(state[key], expected_state[key], F32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_updates_half_precision(seed: int, dtype: torch.dtype) -> None:
    """Half-precision parameters and state, float32 arithmetic: within the dtype's rounding of a float32 update."""
    p32, g32 = torch.randn(9, 40), torch.randn(9, 40)
    rows = torch.tensor([0, 3, 8])
    p, g = p32.to(dtype).to(DEVICE), g32.to(dtype).to(DEVICE)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ref, ref_m, ref_v = p.float().cpu(), torch.zeros(9, 40), torch.zeros(9, 40)
    ref[rows] = torch_step_on_rows(lambda ps: torch.optim.Adam(ps, lr=0.01), ref, g.float().cpu(), rows,
                                   {"exp_avg": ref_m, "exp_avg_sq": ref_v}, 1)
    adam_rows_(p, g, rows.to(DEVICE), m, v, 1.0, 0.01, (0.9, 0.999), 1e-8)
    assert_close_to_reference(p, ref, dtype)
    assert_close_to_reference(m, ref_m, dtype)


def test_row_updates_reject_bad_arguments() -> None:
    p, g = torch.zeros(4, 3, device=DEVICE), torch.zeros(4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="momentum buffer"):
        sgd_rows_(p, g, None, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="grad must be contiguous"):
        sgd_rows_(p, torch.zeros(3, 4, device=DEVICE).t(), None, 0.1)
    with pytest.raises(ValueError, match="rows must be an int64"):
        sgd_rows_(p, g, torch.tensor([1, 2], dtype=torch.int32, device=DEVICE), 0.1)
    with pytest.raises(ValueError, match="contiguous float32"):
        sgd_rows_(p.double(), g.double(), None, 0.1)
    with pytest.raises(ValueError, match="step"):
        adam_rows_(p, g, None, torch.zeros_like(p), torch.zeros_like(p), 0.0, 0.01, (0.9, 0.999), 1e-8)


# ---------------------------------------------------------------------------------------- backend


@pytest.fixture
def triton_backend():
    try:
        return get_backend("triton")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def test_backend_topk_backward_with_hits(seed: int, triton_backend) -> None:
    rows, cols, n_in, k = 6, 40, 23, 9
    g = gradient(rows, cols, "ties", device=DEVICE)
    x = torch.randn(rows, n_in, device=DEVICE)
    weight = torch.randn(cols, n_in, device=DEVICE)
    hits = torch.zeros(cols, dtype=torch.int64, device=DEVICE)
    ref_hits = torch.zeros(cols, dtype=torch.int64)
    dx, dw, idx = triton_backend.topk_backward(g, x, weight, k, hits)
    edx, edw, eidx = REF.topk_backward(g.cpu(), x.cpu(), weight.cpu(), k, ref_hits)
    assert torch.equal(idx.cpu(), eidx)
    assert torch.equal(hits.cpu(), ref_hits)
    assert_close_to_reference(dx, edx, F32)
    assert_close_to_reference(dw, edw, F32)
    sdx, sdw = triton_backend.sparse_backward(g, idx, x, weight)
    assert_close_to_reference(sdx, edx, F32)
    assert_close_to_reference(sdw, edw, F32)
    # without dx: the select-only kernel, the same indices, hits and dW
    hits_without = torch.zeros(cols, dtype=torch.int64, device=DEVICE)
    none, dw_without, idx_without = triton_backend.topk_backward(g, x, weight, k, hits_without, need_dx=False)
    assert none is None and triton_backend.sparse_backward(g, idx, x, weight, need_dx=False)[0] is None
    assert torch.equal(idx_without, idx) and torch.equal(hits_without, hits) and torch.equal(dw_without, dw)


@pytest.mark.parametrize(("rows", "cols", "n_in", "k"), [(6, 37, 20, 7), (1, 12, 5, 12), (16, 128, 33, 1)])
def test_backend_unified_matches_reference(seed: int, triton_backend, rows: int, cols: int, n_in: int, k: int) -> None:
    g = gradient(rows, cols, "ties", device=DEVICE)  # integer entries: column sums are exact, so ties are real ties
    x = torch.randn(rows, n_in, device=DEVICE)
    weight = torch.randn(cols, n_in, device=DEVICE)
    assert torch.equal(triton_backend.column_scores(g).cpu(), g.abs().sum(dim=0).cpu())
    dx, dw, sel = triton_backend.unified_backward(g, x, weight, k)
    edx, edw, ecols = REF.unified_backward(g.cpu(), x.cpu(), weight.cpu(), k)
    assert torch.equal(sel.cpu(), ecols)
    assert_close_to_reference(dx, edx, F32)
    assert_close_to_reference(dw, edw, F32)


@pytest.mark.parametrize("payload", [float("nan"), float("inf"), -float("inf")])
def test_backend_rejects_non_finite(triton_backend, payload: float) -> None:
    """On CPU tensors the flag's copy arrives at once: the call that ranked the NaN raises, and the
    flag is cleared, so the next call with a finite gradient runs."""
    g = gradient(2, 8, "random", device=DEVICE)
    g[1, 3] = payload
    with pytest.raises(InvalidGradientError, match="non-finite"):
        triton_backend.topk_indices(g, 3)
    x, weight = torch.randn(2, 5, device=DEVICE), torch.randn(8, 5, device=DEVICE)
    with pytest.raises(InvalidGradientError, match="non-finite"):
        triton_backend.topk_backward(g, x, weight, 3, need_dx=False)
    with pytest.raises(InvalidGradientError, match="non-finite"):
        triton_backend.unified_backward(g, x, weight, 3)
    g[1, 3] = 0.0
    assert torch.equal(triton_backend.topk_indices(g, 3).cpu(), REF.topk_indices(g.cpu(), 3))


class _InFlight:
    """A CUDA event stand-in whose copy has not arrived until :meth:`arrive`: the asynchronous case on CPU."""

    def __init__(self) -> None:
        self.arrived = False

    def record(self, stream: object = None) -> None:
        self.arrived = False

    def query(self) -> bool:
        return self.arrived

    def arrive(self) -> None:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()  # the real copy behind the stand-in
        self.arrived = True

    def synchronize(self) -> None:
        self.arrive()


def test_backend_reports_non_finite_without_waiting(triton_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the flag's copy still in flight no call waits for it; a later call raises once it arrived,
    and ``raise_if_non_finite`` waits for it."""
    flag = triton_backend.non_finite_flag(DEVICE)
    event = _InFlight()
    monkeypatch.setattr(flag, "event", event)
    bad = gradient(3, 10, "random", device=DEVICE)
    bad[0, 0] = float("nan")
    good = gradient(3, 10, "random", device=DEVICE)
    triton_backend.topk_indices(bad, 2)  # in flight: no error yet, and no wait
    triton_backend.topk_indices(good, 2)
    event.arrive()
    with pytest.raises(InvalidGradientError, match="non-finite"):
        triton_backend.topk_indices(good, 2)  # the earlier NaN, reported by the next call
    triton_backend.topk_indices(good, 2)  # cleared
    triton_backend.topk_indices(bad, 2)
    with pytest.raises(InvalidGradientError, match="non-finite"):
        triton_backend.raise_if_non_finite()
    triton_backend.raise_if_non_finite()  # nothing left


def test_backend_unavailable_without_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the backend is available")
    from mesimp_gpu.backends.triton_backend import TritonBackend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        TritonBackend()


@pytest.mark.parametrize(
    ("mode", "k", "sparse_bias"),
    [
        (MePropMode.TOPK, 5, False),
        (MePropMode.TOPK, 5, True),
        (MePropMode.UNIFIED, 7, True),
        (MePropMode.TOPK, 40, False),
    ],
)
def test_meprop_linear_triton_matches_reference(
    seed: int, triton_backend, mode: MePropMode, k: int, sparse_bias: bool
) -> None:
    rows, n_in, n_out = 6, 20, 24
    layers = {
        name: MePropLinear(
            n_in, n_out, MePropConfig(mode=mode, k=k, backend=name, sparse_bias=sparse_bias), track_hits=True
        )
        for name in ("triton", "reference")
    }
    layers["reference"].load_state_dict(layers["triton"].state_dict())
    layers["triton"].to(DEVICE)
    x = torch.randn(rows, n_in)
    # integer-valued upstream gradients make the unified column sums exact (no float near-ties)
    upstream = torch.randint(-4, 5, (rows, n_out)).float()
    grads = {}
    for name, layer in layers.items():
        dev = DEVICE if name == "triton" else torch.device("cpu")
        xi = x.to(dev).requires_grad_(True)
        layer(xi).backward(upstream.to(dev))
        grads[name] = (xi.grad.cpu(), layer.weight.grad.cpu(), layer.bias.grad.cpu(), layer.hits.cpu())
    for got, expected in zip(grads["triton"][:3], grads["reference"][:3], strict=True):
        assert_close_to_reference(got, expected, F32)
    assert torch.equal(grads["triton"][3], grads["reference"][3])
    assert int(grads["triton"][3].sum()) == rows * min(k, n_out)


# ------------------------------------------------------------------------------ realistic sizes, GPU

@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "cols", "n_in", "k", "dtype"),
    [
        (100, 500, 784, 160, torch.float32),
        (100, 500, 784, 160, torch.float16),
        (1024, 8192, 8192, 32, torch.float32),
        (10, 500, 500, 20, torch.float32),
        (64, 20000, 300, 77, torch.float32),
    ],
)
def test_gpu_realistic_sizes(seed: int, rows: int, cols: int, n_in: int, k: int, dtype: torch.dtype) -> None:
    """Indices equal to the reference (exact comparisons), products within tolerance, dW reproducible."""
    backend = get_backend("triton")
    g = torch.randn(rows, cols, device="cuda", dtype=dtype)
    g[0, : cols // 2] = 1.0  # a row full of ties
    x = torch.randn(rows, n_in, device="cuda", dtype=dtype)
    weight = torch.randn(cols, n_in, device="cuda", dtype=dtype)
    hits = torch.zeros(cols, dtype=torch.int64, device="cuda")
    dx, dw, idx = backend.topk_backward(g, x, weight, k, hits)
    eidx = REF.topk_indices(g, k)
    assert torch.equal(idx, eidx)
    assert torch.equal(hits, torch.bincount(eidx.reshape(-1), minlength=cols))
    edx, edw = REF.sparse_backward(g, eidx, x, weight)
    assert_close_to_reference(dx, edx, dtype, terms=k, gpu=True)
    assert_close_to_reference(dw, edw, dtype, terms=rows, gpu=True)
    _, dw_again, _ = backend.topk_backward(g, x, weight, k)
    assert torch.equal(dw, dw_again), "dW is not bitwise reproducible"

    udx, udw, sel = backend.unified_backward(g, x, weight, k)
    scores = g.double().abs().sum(dim=0)
    chosen = torch.zeros(cols, dtype=torch.bool, device="cuda").index_fill_(0, sel, True)
    assert int(chosen.sum()) == k
    if k < cols:  # float32 column sums may reorder near-equal scores, nothing more
        assert float(scores[chosen].min()) >= float(scores[~chosen].max()) * (1 - tolerance(F32, gpu=True)[1])
    g_s = g[:, sel].double()
    assert_close_to_reference(udx, g_s @ weight[sel].double(), dtype, terms=k, gpu=True)
    assert_close_to_reference(udw[sel], g_s.t() @ x.double(), dtype, terms=rows, gpu=True)
    assert not bool(udw[~chosen].any())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sgd-momentum", "adam", "adagrad"])
def test_gpu_row_updates_match_the_portable_path(seed: int, name: str) -> None:
    """A 500 x 784 weight, 160 touched rows, several steps: the kernels against the backends' portable torch ops."""
    from mesimp_gpu.backends.torch_backend import TorchBackend

    kernels, portable = get_backend("triton"), TorchBackend()
    keys = ROW_UPDATES[name][2]
    p = torch.randn(500, 784, device="cuda")
    runs = {b: (p.clone(), {key: torch.zeros_like(p) for key in keys}) for b in (kernels, portable)}
    for step in range(1, 4):
        rows = torch.randperm(500, device="cuda")[:160].sort().values
        grad = torch.randn(500, 784, device="cuda")
        for backend, (param, st) in runs.items():
            if name == "sgd-momentum":
                backend.sgd_rows_(param, grad, rows, 0.1, 5.0, 0.9, st["momentum_buffer"])
            elif name == "adam":
                backend.adam_rows_(param, grad, rows, st["exp_avg"], st["exp_avg_sq"], float(step), 1e-3,
                                   (0.9, 0.999), 1e-8, 5.0)
            else:
                backend.adagrad_rows_(param, grad, rows, st["sum"], 0.1, 1e-6, 5.0)
    (got, got_state), (want, want_state) = runs[kernels], runs[portable]
    assert_close_to_reference(got, want, F32)  # element-wise float32 steps: no sum, no GPU margin
    for key in keys:
        assert_close_to_reference(got_state[key], want_state[key], F32)

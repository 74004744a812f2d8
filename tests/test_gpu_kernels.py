"""What a first run on a real GPU must check (``pytest -m gpu``; every test here is skipped without CUDA).

The interpreter tests in ``test_triton_kernels.py`` cover the kernels' logic on tiny shapes; these add
what only a device shows: NaN payloads produced by CUDA arithmetic, unaligned widths and ``k = n`` at
real sizes (the compiled, vectorised code paths), half precision, hot columns for ``dW``,
determinism of ``dW`` and of the hit counts, offsets beyond ``2**31``, a non-default torch stream and
a second device for both CUDA backends, and the lazy optimizers' row updates at realistic size
against ``torch.optim``. Results are compared with the float64 reference (indices exactly).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

pytestmark = pytest.mark.gpu

from mesimp_gpu.backends import BackendUnavailable, get_backend  # noqa: E402
from mesimp_gpu.backends.base import InvalidGradientError  # noqa: E402
from reference import REF, assert_close_to_reference, torch_step_on_rows  # noqa: E402

CUDA = torch.device("cuda")
F32 = torch.float32


def _backend(name: str):
    try:
        return get_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def _kernels():
    pytest.importorskip("triton")
    from mesimp_gpu.kernels import gather, row_updates, rows, topk, unified

    return gather, row_updates, rows, topk, unified


def magnitude_bits(g: Tensor) -> Tensor:
    """``|g|`` as float32 bit patterns (int64, same shape): how the kernels rank NaN and inf too."""
    return (g.float().view(torch.int32) & 0x7FFFFFFF).long()


@pytest.mark.parametrize("n", [512, 4096, 4999, 8192, 20000])
def test_nan_payload_from_cuda_arithmetic(seed: int, n: int) -> None:
    """0/0 on the device (payload 0x7FFFFFFF) in at least k entries of some rows: every slot is still
    written with the bit-ranked selection, and the device flag is set."""
    _, _, _, topk, _ = _kernels()
    k = 32
    g = torch.randn(64, n, device=CUDA)
    zeros = torch.zeros(64, n, device=CUDA)
    nan = zeros / zeros  # CUDA's NaN
    g[0] = nan[0]  # a whole row
    g[1, : 2 * k] = nan[1, : 2 * k]
    g[2, n - k:] = nan[2, n - k:]
    flag = torch.zeros(1, dtype=torch.int32, device=CUDA)
    vals = torch.full((64, k), float("nan"), device=CUDA)
    idx = torch.full((64, k), -1, dtype=torch.int64, device=CUDA)
    topk.topk_select(g, k, flag=flag, out=(vals, idx))
    expected = REF.topk_indices(magnitude_bits(g).double().cpu(), k)
    assert torch.equal(idx.cpu(), expected)
    assert torch.equal(vals.view(torch.int32).cpu(), g.gather(1, idx).view(torch.int32).cpu())
    assert int(flag) == 1


def test_backend_reports_nan_after_the_step(seed: int) -> None:
    """The backward does not wait for the flag; ``raise_if_non_finite`` (and, once the copy arrived,
    the next call) raises the clear error, and the flag is clear afterwards."""
    backend = _backend("triton")
    g = torch.randn(256, 4096, device=CUDA)
    g[5, 7] = float("nan")
    x, w = torch.randn(256, 512, device=CUDA), torch.randn(4096, 512, device=CUDA)
    try:
        backend.topk_backward(g, x, w, 32)  # raises only if the flag's copy has already arrived
    except InvalidGradientError:
        pass
    else:
        with pytest.raises(InvalidGradientError, match="non-finite"):
            backend.raise_if_non_finite()
    backend.raise_if_non_finite()  # cleared
    good = torch.randn(4, 64, device=CUDA)
    assert torch.equal(backend.topk_indices(good, 3), REF.topk_indices(good, 3))
    g[5, 7] = 0.0
    backend.topk_backward(g, x, w, 32)
    torch.cuda.synchronize()
    backend.topk_indices(good, 3)  # the copy has arrived and shows nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "n", "n_in", "k"),
    [(1024, 4999, 300, 37), (100, 4096, 4096, 4096), (257, 8192, 1000, 1), (64, 8192, 96, 512), (33, 70001, 64, 40)],
)
def test_triton_backward_matches_reference(
    seed: int, batch: int, n: int, n_in: int, k: int, dtype: torch.dtype
) -> None:
    """Unaligned widths, k = n, k = 1, the fused (n_in <= 128) and unfused dx, one- and two-stage rows."""
    backend = _backend("triton")
    g = torch.randn(batch, n, device=CUDA).to(dtype)
    g[0, : n // 2] = 1.0  # a row of ties
    x = torch.randn(batch, n_in, device=CUDA).to(dtype)
    w = torch.randn(n, n_in, device=CUDA).to(dtype)
    hits = torch.zeros(n, dtype=torch.int64, device=CUDA)
    dx, dw, idx = backend.topk_backward(g, x, w, k, hits)
    backend.raise_if_non_finite()
    eidx = REF.topk_indices(g, k)
    assert torch.equal(idx, eidx)
    assert torch.equal(hits, torch.bincount(eidx.reshape(-1), minlength=n))
    edx, edw = REF.sparse_backward(g, eidx, x, w)
    assert_close_to_reference(dx, edx, dtype, terms=k, gpu=True)
    assert_close_to_reference(dw, edw, dtype, terms=batch, gpu=True)
    none, dw_alone, idx_alone = backend.topk_backward(g, x, w, k, need_dx=False)
    assert none is None and torch.equal(idx_alone, idx) and torch.equal(dw_alone, dw)


def test_dw_hot_columns_and_hits_are_deterministic(seed: int) -> None:
    """Every example picks the same columns: segments of length B in the dW kernel. dW and hits are
    bitwise equal over repeated runs and match the reference."""
    backend = _backend("triton")
    batch, n, n_in, k = 1024, 8192, 1024, 32
    g = torch.randn(batch, n, device=CUDA) * 0.01
    hot = torch.randperm(n, device=CUDA)[:k]
    g[:, hot] = torch.randn(batch, k, device=CUDA).abs() + 1.0
    x, w = torch.randn(batch, n_in, device=CUDA), torch.randn(n, n_in, device=CUDA)
    runs = []
    for _ in range(3):
        hits = torch.zeros(n, dtype=torch.int64, device=CUDA)
        dx, dw, idx = backend.topk_backward(g, x, w, k, hits)
        runs.append((dx, dw, idx, hits))
    for dx, dw, idx, hits in runs[1:]:
        assert torch.equal(dx, runs[0][0]) and torch.equal(dw, runs[0][1]), "results are not bitwise reproducible"
        assert torch.equal(idx, runs[0][2]) and torch.equal(hits, runs[0][3])
    dx, dw, idx, hits = runs[0]
    assert torch.equal(idx, hot.sort().values.expand(batch, k))
    assert int(hits[hot].min()) == batch and int(hits.sum()) == batch * k
    edx, edw = REF.sparse_backward(g, idx, x, w)
    assert_close_to_reference(dw, edw, F32, terms=batch, gpu=True)
    assert not bool(dw[torch.ones(n, dtype=torch.bool, device=CUDA).index_fill_(0, hot, False)].any())


def test_offsets_beyond_int32(seed: int) -> None:
    """fp16 70000 x 32768 (2.3e9 entries, 4.6 GB): row offsets past 2**31 in the selection (two stages)
    and in the column scores; a 32768 x 70000 dW written past 2**31."""
    gather, _, rows, topk, unified = _kernels()
    batch, n, k = 70000, 32768, 8
    g = torch.randn(batch, n, device=CUDA, dtype=torch.float16)
    vals, idx = topk.topk_select(g, k)
    tail = slice(batch - 16, batch)
    assert torch.equal(idx[tail].cpu(), REF.topk_indices(g[tail].cpu(), k))
    assert torch.equal(idx[:16].cpu(), REF.topk_indices(g[:16].cpu(), k))
    scores = unified.column_scores(g)
    assert_close_to_reference(scores, g.abs().sum(dim=0, dtype=torch.float64), F32, terms=batch, gpu=True)
    del g, vals
    out_features, n_in = 32768, 70000
    vals = torch.randn(4, k, device=CUDA, dtype=torch.float16)
    idx = torch.tensor([[out_features - 1 - j for j in range(k)]] * 4, device=CUDA).sort(dim=1).values
    x = torch.randn(4, n_in, device=CUDA, dtype=torch.float16)
    dw = rows.meprop_dw(vals, idx, x, out_features)
    expected = vals.double().t() @ x.double()  # (k, in): the last k rows, each the sum of 4 outer products
    assert_close_to_reference(dw[idx[0]], expected, torch.float16, terms=4, gpu=True)
    assert not bool(dw[: out_features - k].any())
    w = torch.randn(out_features, n_in, device=CUDA, dtype=torch.float16)
    dx = gather.meprop_dx(vals, idx, w)
    assert_close_to_reference(dx, vals.double() @ w[idx[0]].double(), torch.float16, terms=k, gpu=True)


@pytest.mark.parametrize("name", ["triton", "cupy"])
def test_non_default_stream(seed: int, name: str) -> None:
    """Work queued on a side stream just before the call (g produced by a long GEMM there) must be
    seen by the backend's launches, which run on torch's current stream."""
    if name == "cupy":
        pytest.importorskip("cupy")
    backend = _backend(name)
    a, b = torch.randn(2048, 8192, device=CUDA), torch.randn(8192, 4096, device=CUDA)
    x, w = torch.randn(2048, 256, device=CUDA), torch.randn(4096, 256, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        g = a @ b  # still running when the backend is called
        dx, dw, idx = backend.topk_backward(g, x, w, 20)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g_ref = a @ b
    eidx = REF.topk_indices(g_ref, 20)
    assert torch.equal(idx, eidx)
    edx, edw = REF.sparse_backward(g_ref, eidx, x, w)
    assert_close_to_reference(dx, edx, F32, terms=20, gpu=True)
    assert_close_to_reference(dw, edw, F32, terms=2048, gpu=True)


@pytest.mark.parametrize("name", ["triton", "cupy"])
def test_second_device(seed: int, name: str) -> None:
    """Tensors on cuda:1 while cuda:0 is current: the launches must run on cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    if name == "cupy":
        pytest.importorskip("cupy")
    backend = _backend(name)
    dev = torch.device("cuda", 1)
    g, x, w = torch.randn(300, 5000, device=dev), torch.randn(300, 200, device=dev), torch.randn(5000, 200, device=dev)
    hits = torch.zeros(5000, dtype=torch.int64, device=dev)
    with torch.cuda.device(0):
        dx, dw, idx = backend.topk_backward(g, x, w, 50, hits)
        udx, udw, cols = backend.unified_backward(g, x, w, 50)
    eidx = REF.topk_indices(g, 50)
    assert idx.device == dev and torch.equal(idx, eidx)
    assert torch.equal(hits, torch.bincount(eidx.reshape(-1), minlength=5000))
    edx, edw = REF.sparse_backward(g, eidx, x, w)
    assert_close_to_reference(dx, edx, F32, terms=50, gpu=True)
    assert_close_to_reference(dw, edw, F32, terms=300, gpu=True)
    ecols = REF.topk_indices(g.double().abs().sum(dim=0, keepdim=True), 50)[0]
    assert cols.device == dev and int(torch.isin(cols, ecols).sum()) >= 48  # float32 column sums: near-ties only


@pytest.mark.parametrize("name", ["sgd-momentum", "adam", "adagrad"])
def test_row_updates_at_realistic_size_match_torch_optim(seed: int, name: str) -> None:
    """A 30000 x 512 embedding-like weight, 4096 touched rows per step, three steps: the kernels against
    torch.optim on the touched rows (float64 twin on the CPU); untouched rows and state unchanged."""
    _, row_updates, _, _, _ = _kernels()
    n, width = 30000, 512
    p = torch.randn(n, width, device=CUDA)
    keys = {"sgd-momentum": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adagrad": ("sum",)}[name]
    make = {
        "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-6),
    }[name]
    state = {key: torch.zeros_like(p) for key in keys}
    expected = p.cpu().double()
    expected_state = {key: torch.zeros(n, width, dtype=torch.float64) for key in keys}
    for step in range(1, 4):
        rows = torch.randperm(n)[:4096].sort().values
        grad = torch.randn(n, width)
        expected[rows] = torch_step_on_rows(make, expected, grad.double(), rows, expected_state, step)
        rows_d, grad_d = rows.to(CUDA), grad.to(CUDA)
        if name == "sgd-momentum":
            row_updates.sgd_rows_(p, grad_d, rows_d, 0.1, None, 0.9, state["momentum_buffer"])
        elif name == "adam":
            row_updates.adam_rows_(p, grad_d, rows_d, state["exp_avg"], state["exp_avg_sq"], float(step), 1e-3,
                                   (0.9, 0.999), 1e-8)
        else:
            row_updates.adagrad_rows_(p, grad_d, rows_d, state["sum"], 0.1, 1e-6)
    assert_close_to_reference(p, expected, F32)
    for key in keys:
        assert_close_to_reference(state[key], expected_state[key], F32)

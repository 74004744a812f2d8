"""The CuPy backend: its array logic run with NumPy against the reference, and its CUDA source through nvcc.

CuPy cannot run without a GPU, so :mod:`mesimp_gpu.backends.cupy_logic` is exercised with ``xp = numpy``
(the same code the backend runs with ``xp = cupy``). The radix-select RawKernel source is compiled
with ``nvcc -cubin -arch=sm_80``; the tie-fill that turns its threshold into indices is the torch
backend's, tested with a supplied threshold in ``test_meprop.py``. The ``gpu``-marked tests run the
real backend when CuPy and a CUDA device are present.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mesimp_gpu.backends import BackendUnavailable, get_backend
from mesimp_gpu.backends import cupy_logic as logic
from mesimp_gpu.backends.base import masked_gradient
from mesimp_gpu.backends.torch_backend import threshold_indices
from reference import REF, assert_close_to_reference, gradient, tolerance

F32 = torch.float32


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def reference_idx(g: np.ndarray, k: int) -> np.ndarray:
    return REF.topk_indices(torch.from_numpy(g), k).numpy()


def logic_select(g: np.ndarray, k: int) -> np.ndarray:
    """The backend's selection with NumPy in CuPy's place: magnitude bits, the kernel's bitwise search
    (its NumPy twin), the torch tie-fill on the same integers."""
    bits = logic.magnitude_bits(np, g)
    kth = logic.kth_largest_bits(np, bits, k)
    return threshold_indices(torch.from_numpy(bits), torch.from_numpy(kth).unsqueeze(1), k).numpy()


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor as the ``uint16`` array the backend hands CuPy."""
    return t.view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("kind", ["random", "ties", "sparse", "tiny"])
@pytest.mark.parametrize(("rows", "cols", "k"), [(5, 37, 1), (5, 37, 7), (3, 37, 37), (16, 128, 20)])
def test_selection_matches_reference(seed: int, kind: str, rows: int, cols: int, k: int) -> None:
    g = gradient(rows, cols, kind)
    assert np.array_equal(logic_select(g.numpy(), k), REF.topk_indices(g, k).numpy())


def test_float64_is_ranked_at_float64_precision(seed: int) -> None:
    """Magnitudes equal in float32 but not in float64: the reference ranks them in float64, and every
    row keeps exactly k (rounding the threshold to float32 but comparing in float64 kept fewer)."""
    base = (np.abs(gradient(6, 1, "random").numpy()) + 1.0).astype(np.float64)  # float32 values, exactly
    g = base + np.arange(40) * 1e-12  # one float32 value per row, 40 distinct float64 ones, largest last
    g[1] *= -1
    assert all(len(np.unique(row.astype(np.float32))) == 1 for row in g)
    for k in (1, 7, 40):
        idx = logic_select(g, k)
        assert idx.shape == (6, k)
        assert np.array_equal(idx, REF.topk_indices(torch.from_numpy(g), k).numpy())
        # float64 ranking keeps the last k columns; ranked in float32 all 40 tie and the first k would win
        assert np.array_equal(idx, np.tile(np.arange(40 - k, 40), (6, 1)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_selection_and_products(seed: int, dtype: torch.dtype) -> None:
    """float16 crosses as itself, bfloat16 as its uint16 bits (CuPy has no bfloat16): both are ranked
    exactly and multiplied in float32."""
    g = gradient(5, 37, "random", dtype)
    x, weight = torch.randn(5, 20).to(dtype), torch.randn(37, 20).to(dtype)
    as_np = bf16_bits if dtype == torch.bfloat16 else (lambda t: t.numpy())
    idx = REF.topk_indices(g, 7)
    assert np.array_equal(logic_select(as_np(g), 7), idx.numpy())
    vals = g.gather(1, idx)
    g_k = masked_gradient(g, idx).double()  # the exact products of the half-precision values, in float64
    dx = logic.sparse_dx(np, as_np(vals), idx.numpy(), as_np(weight))
    assert_close_to_reference(dx, g_k @ weight.double(), F32)
    dw = np.zeros((37, 20), dtype=np.float32)
    logic.accumulate_dw(np, as_np(vals), idx.numpy(), as_np(x), dw)
    assert_close_to_reference(dw, g_k.t() @ x.double(), F32)
    scores = logic.column_scores(np, as_np(g))
    assert_close_to_reference(scores, g.double().abs().sum(dim=0), F32)


@pytest.mark.parametrize(("rows", "cols", "n_in", "k"), [(5, 37, 20, 7), (1, 9, 3, 9), (16, 40, 130, 5)])
def test_products_match_reference(rng: np.random.Generator, rows: int, cols: int, n_in: int, k: int) -> None:
    g = gradient(rows, cols, "random").numpy()  # the seed fixture seeds torch's RNG, rng NumPy's
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    weight = rng.standard_normal((cols, n_in)).astype(np.float32)
    idx = reference_idx(g, k)
    vals = np.take_along_axis(g, idx, axis=1)
    edx, edw = REF.sparse_backward(
        torch.from_numpy(g), torch.from_numpy(idx), torch.from_numpy(x), torch.from_numpy(weight)
    )
    assert_close_to_reference(logic.sparse_dx(np, vals, idx, weight), edx, F32)
    start = rng.standard_normal((cols, n_in)).astype(np.float32)
    dw = start.copy()
    logic.accumulate_dw(np, vals, idx, x, dw)
    assert_close_to_reference(dw, start.astype(np.float64) + edw.double().numpy(), F32)
    untouched = np.setdiff1d(np.arange(cols), idx)
    np.testing.assert_array_equal(dw[untouched], start[untouched])  # rows no example kept are not written


@pytest.mark.parametrize("kind", ["random", "ties", "sparse"])
def test_column_scores(seed: int, kind: str) -> None:
    g = gradient(13, 70, kind).numpy()
    scores = logic.column_scores(np, g)
    assert scores.dtype == np.float32 and scores.shape == (70,)
    assert_close_to_reference(scores, np.abs(g.astype(np.float64)).sum(axis=0), F32)


def test_kth_kernel_compiles_with_nvcc(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = tmp_path / "kth_largest.cu"
    src.write_text(logic.KTH_LARGEST_SOURCE)
    cubin = tmp_path / "kth_largest.cubin"
    result = subprocess.run(
        [nvcc, "-cubin", "-arch=sm_80", "-Xptxas", "-v", "-o", str(cubin), str(src)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    print(f"\n[nvcc] kth_largest_bits sm_80: {result.stderr.strip()}")
    assert cubin.stat().st_size > 0
    for name in logic.KTH_KERNELS.values():
        assert name.encode() in cubin.read_bytes()


def test_backend_unavailable_without_cupy_or_cuda() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailable, match="cupy"):
            get_backend("cupy")
        return
    if torch.cuda.is_available():
        pytest.skip("CuPy and a CUDA device are present: the backend is available")
    with pytest.raises(BackendUnavailable):
        get_backend("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "cols", "n_in", "k"), [(100, 500, 784, 160), (1024, 8192, 1024, 32), (7, 37, 20, 37)])
def test_gpu_cupy_backend_matches_reference(seed: int, rows: int, cols: int, n_in: int, k: int) -> None:
    pytest.importorskip("cupy")
    backend = get_backend("cupy")
    g = torch.randn(rows, cols, device="cuda")
    g[0, : cols // 2] = 1.0  # a row full of ties
    x = torch.randn(rows, n_in, device="cuda")
    weight = torch.randn(cols, n_in, device="cuda")
    hits = torch.zeros(cols, dtype=torch.int64, device="cuda")
    dx, dw, idx = backend.topk_backward(g, x, weight, k, hits)
    eidx = REF.topk_indices(g, k)
    assert torch.equal(idx, eidx)
    assert torch.equal(hits, torch.bincount(eidx.reshape(-1), minlength=cols))
    edx, edw = REF.sparse_backward(g, eidx, x, weight)
    assert_close_to_reference(dx, edx, F32, terms=k, gpu=True)
    # dW sums over the rows, but this test was written with atol per sqrt(k): kept until a GPU run measures it
    assert_close_to_reference(dw, edw, F32, terms=k, gpu=True)
    none, dw_alone, idx_alone = backend.topk_backward(g, x, weight, k, need_dx=False)
    assert none is None and torch.equal(idx_alone, idx) and torch.equal(dw_alone, dw)
    assert backend.sparse_backward(g, eidx, x, weight, need_dx=False)[0] is None

    udx, udw, cols_sel = backend.unified_backward(g, x, weight, k)
    scores = g.double().abs().sum(dim=0)
    chosen = torch.zeros(cols, dtype=torch.bool, device="cuda").index_fill_(0, cols_sel, True)
    assert int(chosen.sum()) == k and bool((cols_sel[1:] > cols_sel[:-1]).all())
    if k < cols:  # float32 column sums may reorder near-equal scores, nothing more
        assert float(scores[chosen].min()) >= float(scores[~chosen].max()) * (1 - tolerance(F32, gpu=True)[1])
    assert not bool(udw[~chosen].any())
    g_s = g[:, cols_sel].double()
    assert_close_to_reference(udx, g_s @ weight[cols_sel].double(), F32, terms=k, gpu=True)
    assert_close_to_reference(udw[cols_sel], g_s.t() @ x.double(), F32, terms=rows, gpu=True)

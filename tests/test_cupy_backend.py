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
from mesimp_gpu.backends.reference import ReferenceBackend

REF = ReferenceBackend()

#: dtype -> (atol, rtol) for float32 products against the float64 reference
TOL: dict[np.dtype, tuple[float, float]] = {np.dtype(np.float32): (1e-5, 1e-5)}


def make_g(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    """``random`` normal, ``ties`` small integers (ties and zeros), ``sparse`` mostly zero with an all-zero row."""
    if kind == "random":
        g = rng.standard_normal((rows, cols))
    elif kind == "ties":
        g = rng.integers(-3, 4, (rows, cols)).astype(np.float64)
    elif kind == "sparse":
        g = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < 0.1)
        g[0] = 0.0
    else:
        raise ValueError(kind)
    return g.astype(np.float32)


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_close(actual: np.ndarray, expected: torch.Tensor | np.ndarray) -> None:
    atol, rtol = TOL[np.dtype(np.float32)]
    np.testing.assert_allclose(actual.astype(np.float64), np.asarray(expected, dtype=np.float64), atol=atol, rtol=rtol)


def reference_idx(g: np.ndarray, k: int) -> np.ndarray:
    return REF.topk_indices(torch.from_numpy(g), k).numpy()


@pytest.mark.parametrize(("rows", "cols", "n_in", "k"), [(5, 37, 20, 7), (1, 9, 3, 9), (16, 40, 130, 5)])
def test_products_match_reference(rng: np.random.Generator, rows: int, cols: int, n_in: int, k: int) -> None:
    g = make_g(rng, rows, cols, "random")
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    weight = rng.standard_normal((cols, n_in)).astype(np.float32)
    idx = reference_idx(g, k)
    vals = np.take_along_axis(g, idx, axis=1)
    edx, edw = REF.sparse_backward(
        torch.from_numpy(g), torch.from_numpy(idx), torch.from_numpy(x), torch.from_numpy(weight)
    )
    assert_close(logic.sparse_dx(np, vals, idx, weight), edx)
    start = rng.standard_normal((cols, n_in)).astype(np.float32)
    dw = start.copy()
    logic.accumulate_dw(np, vals, idx, x, dw)
    assert_close(dw, start.astype(np.float64) + edw.double().numpy())
    untouched = np.setdiff1d(np.arange(cols), idx)
    np.testing.assert_array_equal(dw[untouched], start[untouched])  # rows no example kept are not written


@pytest.mark.parametrize("kind", ["random", "ties", "sparse"])
def test_column_scores(rng: np.random.Generator, kind: str) -> None:
    g = make_g(rng, 13, 70, kind)
    scores = logic.column_scores(np, g)
    assert scores.dtype == np.float32 and scores.shape == (70,)
    assert_close(scores, np.abs(g.astype(np.float64)).sum(axis=0))


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
    print(f"\n[nvcc] kth_largest_abs sm_80: {result.stderr.strip()}")
    assert cubin.stat().st_size > 0
    assert b"kth_largest_abs" in cubin.read_bytes()


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
    scale = k**0.5
    torch.testing.assert_close(dx, edx, atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(dw, edw, atol=1e-4 * scale, rtol=1e-4)
    none, dw_alone, idx_alone = backend.topk_backward(g, x, weight, k, need_dx=False)
    assert none is None and torch.equal(idx_alone, idx) and torch.equal(dw_alone, dw)
    assert backend.sparse_backward(g, eidx, x, weight, need_dx=False)[0] is None

    udx, udw, cols_sel = backend.unified_backward(g, x, weight, k)
    scores = g.double().abs().sum(dim=0)
    chosen = torch.zeros(cols, dtype=torch.bool, device="cuda").index_fill_(0, cols_sel, True)
    assert int(chosen.sum()) == k and bool((cols_sel[1:] > cols_sel[:-1]).all())
    if k < cols:  # float32 column sums may reorder near-equal scores, nothing more
        assert float(scores[chosen].min()) >= float(scores[~chosen].max()) * (1 - 1e-4)
    assert not bool(udw[~chosen].any())
    g_s = g[:, cols_sel].double()
    torch.testing.assert_close(udx.double(), g_s @ weight[cols_sel].double(), atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(udw[cols_sel].double(), g_s.t() @ x.double(), atol=1e-4 * rows**0.5, rtol=1e-4)

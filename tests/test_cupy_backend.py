"""The CuPy backend: its array logic run with NumPy against the reference, and its CUDA source through nvcc.

CuPy cannot run without a GPU, so :mod:`mesimp_gpu.backends.cupy_logic` is exercised with ``xp = numpy``
(the same code the backend runs with ``xp = cupy``). The radix-select RawKernel source is compiled
with ``nvcc -cubin -arch=sm_80``, and the ``gpu``-marked tests run the real backend when CuPy and a
CUDA device are present.
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
    """``random`` normal, ``ties`` small integers (ties and zeros), ``sparse`` mostly zero with an all-zero row,
    ``tiny`` subnormals and signed zeros."""
    if kind == "random":
        g = rng.standard_normal((rows, cols))
    elif kind == "ties":
        g = rng.integers(-3, 4, (rows, cols)).astype(np.float64)
    elif kind == "sparse":
        g = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < 0.1)
        g[0] = 0.0
    elif kind == "tiny":  # subnormals, signed zeros and +-x pairs (equal magnitudes)
        g = np.array([1e-40, -1e-40, 2e-45, -0.0, 0.0, 1e-38, -1e-38])[rng.integers(0, 7, (rows, cols))]
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


@pytest.mark.parametrize("kind", ["random", "ties", "sparse", "tiny"])
@pytest.mark.parametrize(
    ("rows", "cols", "k"), [(1, 1, 1), (5, 37, 1), (5, 37, 7), (5, 37, 37), (16, 128, 20), (1, 100, 33)]
)
def test_select_topk_matches_reference(rng: np.random.Generator, rows: int, cols: int, k: int, kind: str) -> None:
    g = make_g(rng, rows, cols, kind)
    vals, idx = logic.select_topk(np, g, k)
    expected = reference_idx(g, k)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(vals, np.take_along_axis(g, expected, axis=1))


def test_select_topk_uses_supplied_threshold(rng: np.random.Generator) -> None:
    """A kernel-supplied ``kth`` (float32 ``[B, 1]``, as the RawKernel returns) gives the same selection."""
    g = make_g(rng, 6, 40, "ties")
    kth = logic.kth_largest(np, np.abs(g), 9).astype(np.float32)
    _, idx = logic.select_topk(np, g, 9, kth)
    np.testing.assert_array_equal(idx, reference_idx(g, 9))


def test_add_hits(rng: np.random.Generator) -> None:
    g = make_g(rng, 7, 30, "ties")
    _, idx = logic.select_topk(np, g, 4)
    hits0 = rng.integers(0, 5, 30).astype(np.int64)
    hits = hits0.copy()
    logic.add_hits(np, hits, idx)
    np.testing.assert_array_equal(hits, hits0 + np.bincount(reference_idx(g, 4).reshape(-1), minlength=30))


@pytest.mark.parametrize(("rows", "cols", "n_in", "k"), [(5, 37, 20, 7), (1, 9, 3, 9), (16, 40, 130, 5)])
def test_products_match_reference(rng: np.random.Generator, rows: int, cols: int, n_in: int, k: int) -> None:
    g = make_g(rng, rows, cols, "random")
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    weight = rng.standard_normal((cols, n_in)).astype(np.float32)
    vals, idx = logic.select_topk(np, g, k)
    edx, edw = REF.sparse_backward(
        torch.from_numpy(g), torch.from_numpy(idx), torch.from_numpy(x), torch.from_numpy(weight)
    )
    assert_close(logic.sparse_dx(np, vals, idx, weight), edx)
    start = rng.standard_normal((cols, n_in)).astype(np.float32)
    dw = start.copy()
    logic.accumulate_dw(np, vals, idx, x, dw)
    assert_close(dw, start.astype(np.float64) + edw.double().numpy())


def _touched(idx: np.ndarray, rows: int) -> np.ndarray:
    mask = np.zeros((rows, 1), dtype=bool)
    mask[np.unique(idx)] = True
    return mask


def test_sgd_rows(rng: np.random.Generator) -> None:
    rows, cols, n_in, k, lr = 4, 30, 19, 3, 0.05
    g = make_g(rng, rows, cols, "random")
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    weight = rng.standard_normal((cols, n_in)).astype(np.float32)
    before = weight.copy()
    vals, idx = logic.select_topk(np, g, k)
    logic.sgd_rows(np, vals, idx, x, weight, lr)
    _, dw = REF.sparse_backward(
        torch.from_numpy(g), torch.from_numpy(idx), torch.from_numpy(x), torch.from_numpy(before)
    )
    assert_close(weight, np.where(_touched(idx, cols), before - lr * dw.numpy(), before))
    np.testing.assert_array_equal(weight[~_touched(idx, cols)[:, 0]], before[~_touched(idx, cols)[:, 0]])


@pytest.mark.parametrize("clip", [None, 0.5])
def test_adam_rows(rng: np.random.Generator, clip: float | None) -> None:
    rows, cols, n_in, k, step = 4, 30, 19, 3, 3
    lr, (beta1, beta2), eps = 0.01, (0.9, 0.999), 1e-8
    g = make_g(rng, rows, cols, "random")
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    weight = rng.standard_normal((cols, n_in)).astype(np.float32)
    m = rng.standard_normal((cols, n_in)).astype(np.float32)
    v = rng.random((cols, n_in)).astype(np.float32)
    w0, m0, v0 = (a.astype(np.float64) for a in (weight, m, v))
    vals, idx = logic.select_topk(np, g, k)
    logic.adam_rows(np, vals, idx, x, weight, m, v, step, lr, (beta1, beta2), eps, clip)

    _, d = REF.sparse_backward(torch.from_numpy(g), torch.from_numpy(idx), torch.from_numpy(x), torch.zeros(cols, n_in))
    d = d.double().numpy()
    if clip is not None:
        d = np.clip(d, -clip, clip)
    m1 = beta1 * m0 + (1 - beta1) * d
    v1 = beta2 * v0 + (1 - beta2) * d * d
    w1 = w0 - lr / (1 - beta1**step) * m1 / (np.sqrt(v1) / np.sqrt(1 - beta2**step) + eps)
    touched = _touched(idx, cols)
    assert_close(m, np.where(touched, m1, m0))
    assert_close(v, np.where(touched, v1, v0))
    assert_close(weight, np.where(touched, w1, w0))


@pytest.mark.parametrize(("rows", "cols", "n_in", "k"), [(6, 37, 20, 7), (1, 12, 5, 12), (16, 128, 33, 1)])
def test_unified_matches_reference(rng: np.random.Generator, rows: int, cols: int, n_in: int, k: int) -> None:
    g = make_g(rng, rows, cols, "ties")  # integer entries: exact column sums, real ties
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    weight = rng.standard_normal((cols, n_in)).astype(np.float32)
    scores = logic.column_scores(np, g)
    assert scores.dtype == np.float32
    _, cols_sel = logic.select_topk(np, scores[None, :], k)
    dx, dw = logic.unified_products(np, g, x, weight, cols_sel[0])
    edx, edw, ecols = REF.unified_backward(torch.from_numpy(g), torch.from_numpy(x), torch.from_numpy(weight), k)
    np.testing.assert_array_equal(cols_sel[0], ecols.numpy())
    assert_close(dx, edx)
    assert_close(dw, edw)


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

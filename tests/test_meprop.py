"""meProp autograd against the float64 reference, for every backend that loads here.

Shapes stay small so that interpreted backends (Triton on CPU) remain quick.
"""

import pytest
import torch

from mesimp_gpu.backends import REGISTRY, BackendUnavailable, InvalidGradientError, load_backend
from mesimp_gpu.backends.reference import topk_mask
from mesimp_gpu.backends.torch_backend import threshold_indices
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode
from reference import assert_close_to_reference, assert_valid_selection, gradient, with_ties

BACKENDS = [name for name in REGISTRY if name != "reference"]
SHAPES = [(1, 7, 5), (6, 13, 9), (16, 37, 11)]  # (batch, in, out)


def backend_or_skip(name: str):
    try:
        return load_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


def grads(layer: MePropLinear, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    layer(x).backward(g)
    return x.grad, layer.weight.grad, layer.bias.grad


def make_layers(n_in: int, n_out: int, config: MePropConfig) -> tuple[MePropLinear, MePropLinear]:
    """The layer under test and an identical float64 twin on the reference backend."""
    layer = MePropLinear(n_in, n_out, config)
    ref = MePropLinear(n_in, n_out, MePropConfig(config.mode, config.k, "reference", config.sparse_bias)).double()
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.normal_()
        layer.bias.copy_(ref.bias)
    return layer, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [MePropMode.TOPK, MePropMode.UNIFIED, MePropMode.RANDOM])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("sparse_bias", [False, True])
def test_gradients_match_reference(backend, mode, shape, k, sparse_bias, seed) -> None:
    backend_or_skip(backend)
    batch, n_in, n_out = shape
    layer, ref = make_layers(n_in, n_out, MePropConfig(mode, k, backend, sparse_bias))
    x = torch.randn(batch, n_in)
    g = with_ties(torch.randn(batch, n_out))
    torch.manual_seed(seed + 1)  # random mode draws the same columns in both runs
    got = grads(layer, x, g)
    torch.manual_seed(seed + 1)
    want = grads(ref, x.double(), g.double())
    for name, a, b in zip(("dx", "dW", "db"), got, want):  # a float32 layer against its float64 twin
        assert_close_to_reference(a, b, torch.float32, msg=f"{name} differs (seed {seed})")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("mode", list(MePropMode))
def test_k_at_least_width_is_exactly_dense(backend, mode, seed) -> None:
    backend_or_skip(backend)
    layer = MePropLinear(9, 6, MePropConfig(mode, 6 if mode is not MePropMode.DENSE else 3, backend))
    dense = torch.nn.Linear(9, 6)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
    x, g = torch.randn(5, 9), torch.randn(5, 6)
    got = grads(layer, x, g)
    xd = x.clone().requires_grad_(True)
    dense(xd).backward(g)
    for a, b in zip(got, (xd.grad, dense.weight.grad, dense.bias.grad)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("k", [1, 3, 8, 12])
def test_selection_invariants(backend, k, seed) -> None:
    impl = backend_or_skip(backend)
    g = with_ties(torch.randn(9, 12))
    idx = impl.topk_indices(g, k)
    assert_valid_selection(g, idx, k)
    kept = torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(kept, topk_mask(g, k)), "tie order differs from the reference (lower index first)"


@pytest.mark.parametrize("kind", ["random", "ties", "sparse", "tiny"])
@pytest.mark.parametrize(
    ("rows", "cols", "k"), [(1, 1, 1), (5, 37, 1), (5, 37, 7), (5, 37, 37), (16, 128, 20), (1, 100, 33)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tie_fill_with_a_supplied_threshold(seed, rows: int, cols: int, k: int, kind: str, dtype) -> None:
    """The shared tie-fill given the k-th largest float32 magnitude, as the CuPy backend's kernel finds it
    (on float32 magnitudes whatever the gradient's dtype): the reference's selection on those magnitudes."""
    g = gradient(rows, cols, kind, dtype)
    a = g.float().abs()
    kth = a.sort(dim=1, descending=True).values[:, k - 1 : k]  # (B, 1): the kernel's exact threshold
    idx = threshold_indices(a, kth, k)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, topk_mask(a, k).nonzero()[:, 1].reshape(rows, k))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_need_dx_false_skips_only_dx(backend, seed) -> None:
    """Every launcher returns None for dx when told it is not needed, and the same dW and indices."""
    impl = backend_or_skip(backend)
    g, x, w = with_ties(torch.randn(6, 13)), torch.randn(6, 9), torch.randn(13, 9)
    idx = impl.topk_indices(g, 4)
    hits, hits_without = torch.zeros(13, dtype=torch.long), torch.zeros(13, dtype=torch.long)
    for with_dx, without in (
        (impl.sparse_backward(g, idx, x, w), impl.sparse_backward(g, idx, x, w, need_dx=False)),
        (impl.topk_backward(g, x, w, 4, hits), impl.topk_backward(g, x, w, 4, hits_without, need_dx=False)),
        (impl.unified_backward(g, x, w, 4), impl.unified_backward(g, x, w, 4, need_dx=False)),
    ):
        assert with_dx[0] is not None and without[0] is None
        for a, b in zip(with_dx[1:], without[1:]):
            assert torch.equal(a, b)
    assert torch.equal(hits, hits_without)


def test_ties_prefer_lower_index() -> None:
    g = torch.tensor([[1.0, -1.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    for name in ["reference", "torch"]:
        idx = load_backend(name).topk_indices(g, 2)
        assert idx.tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("mode", [MePropMode.TOPK, MePropMode.UNIFIED])
def test_nan_gradient_is_a_clear_error(mode) -> None:
    layer = MePropLinear(4, 6, MePropConfig(mode, 2, "torch"))
    g = torch.randn(3, 6)
    g[1, 2] = float("nan")
    with pytest.raises(InvalidGradientError, match="non-finite"):
        layer(torch.randn(3, 4)).backward(g)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k must be at least 1"):
        MePropConfig(MePropMode.TOPK, 0)
    with pytest.raises(ValueError, match="positive"):
        MePropLinear(0, 3)
    layer = MePropLinear(4, 3)
    with pytest.raises(ValueError, match=r"expected input \[\.\.\., 4\]"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend("nope")


def test_hits_count_every_selection() -> None:
    layer = MePropLinear(5, 8, MePropConfig(MePropMode.TOPK, 3, "torch"), track_hits=True)
    x, g = torch.randn(4, 5), torch.randn(4, 8)
    layer(x).backward(g)
    expected = topk_mask(g, 3).sum(dim=0)
    assert torch.equal(layer.hits, expected) and layer.refer == 4
    layer.eval()
    layer(x).backward(g)  # evaluation never counts
    assert torch.equal(layer.hits, expected) and layer.refer == 4


def test_leading_dimensions_are_flattened() -> None:
    layer = MePropLinear(5, 7, MePropConfig(MePropMode.TOPK, 2, "torch"))
    x = torch.randn(2, 3, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, 7)
    g = torch.randn(2, 3, 7)
    y.backward(g)
    mask = topk_mask(g.reshape(6, 7), 2)
    expected = torch.where(mask, g.reshape(6, 7), 0) @ layer.weight.detach()
    torch.testing.assert_close(x.grad.reshape(6, 5), expected)


def test_overflowing_but_finite_gradient_is_accepted() -> None:
    layer = MePropLinear(3, 4, MePropConfig(MePropMode.UNIFIED, 2, "torch"))
    g = torch.full((2, 4), 1e38)  # every entry finite, the sum of all eight overflows
    layer(1e-3 * torch.randn(2, 3)).backward(g)
    assert bool(torch.isfinite(layer.weight.grad).all())

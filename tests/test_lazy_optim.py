"""Lazy SGD and Adam against plain formulas, and the touched-rows record that meProp leaves on weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mesimp_gpu.lazy_optim import (
    MAX_PENDING,
    TOUCHED_ROWS_ATTR,
    compiled_kernels,
    LazyAdagrad,
    LazyAdam,
    LazySGD,
    mark_touched_rows,
    take_touched_rows,
    track_touched_rows,
    union_rows,
)
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode


def row_sparse_grad(p: nn.Parameter, rows: torch.Tensor) -> None:
    """Give ``p`` a gradient that is non-zero only on ``rows``, and record them as meProp does."""
    g = torch.zeros_like(p)
    g[rows] = torch.randn(len(rows), *p.shape[1:], dtype=p.dtype) * 3
    p.grad = g
    mark_touched_rows(p, rows.reshape(1, -1))


def test_record_unites_backward_passes_and_clears():
    w = nn.Parameter(torch.zeros(10, 3))
    track_touched_rows(w)
    mark_touched_rows(w, torch.tensor([[4, 1], [1, 7]]))
    mark_touched_rows(w, torch.tensor([2]))
    assert take_touched_rows(w).tolist() == [1, 2, 4, 7]
    assert w.__dict__[TOUCHED_ROWS_ATTR] == []  # re-armed, empty
    assert take_touched_rows(w) is None  # no rows recorded: dense update
    mark_touched_rows(w, torch.tensor([3]))
    mark_touched_rows(w, None)
    mark_touched_rows(w, torch.tensor([5]))
    assert take_touched_rows(w) is None  # every row
    mark_touched_rows(w, torch.arange(10))
    assert take_touched_rows(w) is None  # all touched: dense is cheaper


def test_compiled_union_matches_torch_union(seed):
    kernels = compiled_kernels(fused=None)
    if kernels is None:
        pytest.skip("the cpu backend's kernels do not build here")
    pending = [torch.randint(0, 37, (5, 3)), torch.tensor([36, 0, 0]), torch.randint(0, 37, (11,))]
    assert torch.equal(kernels.union_rows(pending, 37), union_rows(pending, 37))
    assert kernels.union_rows([torch.zeros(0, dtype=torch.long)], 4).numel() == 0
    with pytest.raises(RuntimeError, match="outside"):
        kernels.union_rows([torch.tensor([4])], 4)


def test_unarmed_weights_are_not_recorded():
    """Weights of dense optimizers: backward leaves nothing on them."""
    w = nn.Parameter(torch.zeros(10, 3))
    mark_touched_rows(w, torch.tensor([1, 2]))
    assert TOUCHED_ROWS_ATTR not in w.__dict__
    layer = MePropLinear(12, 30, MePropConfig(mode=MePropMode.TOPK, k=3, backend="reference"))
    torch.optim.Adam(layer.parameters())
    layer(torch.randn(4, 12)).sum().backward()
    assert TOUCHED_ROWS_ATTR not in layer.weight.__dict__


def test_lazy_optimizer_arms_its_parameters():
    p = nn.Parameter(torch.zeros(4, 2))
    LazySGD([p], lr=0.1)
    assert p.__dict__[TOUCHED_ROWS_ATTR] == []


def test_record_stays_bounded_without_a_lazy_step():
    w = nn.Parameter(torch.zeros(50, 2))
    track_touched_rows(w)
    for i in range(10 * MAX_PENDING):
        mark_touched_rows(w, torch.tensor([i % 40]))
    assert len(w.__dict__[TOUCHED_ROWS_ATTR]) <= MAX_PENDING + 1
    assert take_touched_rows(w).tolist() == list(range(40))


@pytest.mark.parametrize("mode", [MePropMode.TOPK, MePropMode.UNIFIED, MePropMode.RANDOM])
def test_meprop_backward_records_the_rows_of_dw(seed, mode):
    layer = MePropLinear(12, 30, MePropConfig(mode=mode, k=3, backend="reference"))
    LazySGD(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 12)).pow(2).sum().backward()
    nonzero_rows = layer.weight.grad.abs().sum(dim=1).nonzero().squeeze(1)
    rows = take_touched_rows(layer.weight)
    assert set(nonzero_rows.tolist()) <= set(rows.tolist())
    assert rows.dtype == torch.int64 and len(rows) < 30
    assert take_touched_rows(layer.bias) is None  # biases are not recorded: dense update


def test_dense_meprop_records_every_row(seed):
    layer = MePropLinear(5, 6, MePropConfig(mode=MePropMode.TOPK, k=6, backend="reference"))
    LazySGD(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 5)).sum().backward()
    assert layer.weight.__dict__[TOUCHED_ROWS_ATTR] == [None]


#: the compiled in-place kernel and the torch-ops path must agree with the same formulas
FUSED = [pytest.param(True, id="kernel"), pytest.param(False, id="torch-ops")]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("clip", [None, 1.0])
def test_lazy_sgd_is_sgd(seed, clip, fused):
    p = nn.Parameter(torch.randn(20, 4))
    opt = LazySGD([p], lr=0.1, clip_value=clip, fused=fused)
    for rows in ([3, 5, 11], [0, 5], [19]):
        before = p.detach().clone()
        row_sparse_grad(p, torch.tensor(rows))
        g = p.grad if clip is None else p.grad.clamp(-clip, clip)
        expected = before - 0.1 * g
        opt.step()
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lazy_adagrad_is_adagrad(seed, clip, fused, dtype):
    """Step by step equal to torch.optim.Adagrad on the same (clipped) row-sparse gradients."""
    p = nn.Parameter(torch.randn(20, 7, dtype=dtype))
    twin = nn.Parameter(p.detach().clone())
    opt = LazyAdagrad([p], lr=0.1, eps=1e-6, clip_value=clip, fused=fused)
    ref = torch.optim.Adagrad([twin], lr=0.1, eps=1e-6)
    for rows in ([3, 5, 11], [0, 5], [19], [5]):
        row_sparse_grad(p, torch.tensor(rows))
        twin.grad = p.grad.clone() if clip is None else p.grad.clamp(-clip, clip)
        opt.step()
        ref.step()
        torch.testing.assert_close(p.detach(), twin.detach())
    torch.testing.assert_close(opt.state[p]["sum"], ref.state[twin]["sum"])


@pytest.mark.parametrize("fused", FUSED)
def test_lazy_sgd_momentum_touches_only_recorded_rows(seed, fused):
    p = nn.Parameter(torch.randn(8, 3))
    opt = LazySGD([p], lr=0.5, momentum=0.9, fused=fused)
    buf = torch.zeros_like(p)
    expected = p.detach().clone()
    for rows in ([1, 2], [2, 6], [7]):
        row_sparse_grad(p, torch.tensor(rows))
        buf[rows] = 0.9 * buf[rows] + p.grad[rows]
        expected[rows] -= 0.5 * buf[rows]
        opt.step()
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("clip", [None, 0.5])
def test_lazy_adam_formula(seed, clip, fused):
    """Moments decay and rows move only where touched; bias correction uses the parameter's step count."""
    p = nn.Parameter(torch.randn(9, 5))
    lr, (b1, b2), eps = 0.01, (0.9, 0.999), 1e-8
    opt = LazyAdam([p], lr=lr, betas=(b1, b2), eps=eps, clip_value=clip, fused=fused)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    expected = p.detach().clone()
    for t, rows in enumerate(([0, 4], [4, 8, 2], [1], [4]), start=1):
        row_sparse_grad(p, torch.tensor(rows))
        g = p.grad[rows] if clip is None else p.grad[rows].clamp(-clip, clip)
        m[rows] = b1 * m[rows] + (1 - b1) * g
        v[rows] = b2 * v[rows] + (1 - b2) * g * g
        m_hat, v_hat = m[rows] / (1 - b1**t), v[rows] / (1 - b2**t)
        expected[rows] -= lr * m_hat / (v_hat.sqrt() + eps)
        opt.step()
        torch.testing.assert_close(p.detach(), expected)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m)


@pytest.mark.parametrize("fused", FUSED)
def test_without_a_record_lazy_adam_is_adam(seed, fused):
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    lazy, dense = LazyAdam([a, b], lr=0.01, fused=fused), torch.optim.Adam([a2, b2], lr=0.01)
    for _ in range(4):
        ga, gb = torch.randn(6, 4), torch.randn(6)
        a.grad, b.grad, a2.grad, b2.grad = ga.clone(), gb.clone(), ga.clone(), gb.clone()
        lazy.step()
        dense.step()
    torch.testing.assert_close(a.detach(), a2.detach())
    torch.testing.assert_close(b.detach(), b2.detach())


@pytest.mark.parametrize("fused", FUSED)
def test_lazy_sgd_trains_a_meprop_layer_like_sgd(seed, fused):
    torch.manual_seed(seed)
    lazy_layer = MePropLinear(16, 40, MePropConfig(mode=MePropMode.TOPK, k=2, backend="reference"))
    dense_layer = MePropLinear(16, 40, MePropConfig(mode=MePropMode.TOPK, k=2, backend="reference"))
    dense_layer.load_state_dict(lazy_layer.state_dict())
    lazy = LazySGD(lazy_layer.parameters(), lr=0.05, clip_value=5.0, fused=fused)
    dense = torch.optim.SGD(dense_layer.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(3, 16)
        for layer, opt in ((lazy_layer, lazy), (dense_layer, dense)):
            opt.zero_grad()
            layer(x).pow(2).sum().backward()
            if opt is dense:
                nn.utils.clip_grad_value_(layer.parameters(), 5.0)
            opt.step()
    torch.testing.assert_close(lazy_layer.weight, dense_layer.weight)
    torch.testing.assert_close(lazy_layer.bias, dense_layer.bias)


def test_invalid_settings_are_rejected():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError):
        LazySGD(p, lr=0.0)
    with pytest.raises(ValueError):
        LazySGD(p, lr=0.1, clip_value=-1.0)
    with pytest.raises(ValueError):
        LazyAdam(p, betas=(1.0, 0.9))


def test_untouched_parameters_keep_their_values_on_the_kernel_path(seed):
    """A float64 parameter with a record and a non-contiguous one without: both paths in one step."""
    w = nn.Parameter(torch.randn(12, 3, dtype=torch.float64))
    t = nn.Parameter(torch.randn(3, 12).t())  # not contiguous: torch-ops path, dense update
    opt = LazyAdam([w, t], lr=0.1, fused=True)
    before_w, before_t = w.detach().clone(), t.detach().clone()
    row_sparse_grad(w, torch.tensor([2, 9]))
    t.grad = torch.ones_like(t)
    opt.step()
    changed = (w.detach() != before_w).any(dim=1)
    assert changed.nonzero().squeeze(1).tolist() == [2, 9]
    torch.testing.assert_close(t.detach(), before_t - 0.1)  # Adam's first step moves by lr * sign(g)

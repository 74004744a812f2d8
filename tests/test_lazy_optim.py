"""Lazy SGD, Adam and AdaGrad against plain formulas and torch.optim, the backends' row launchers, and the
touched-rows record that meProp leaves on weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mesimp_gpu import backends, touched_rows
from mesimp_gpu.backends import BackendUnavailable, load_backend
from mesimp_gpu.backends.base import union_rows
from mesimp_gpu.lazy_optim import LazyAdagrad, LazyAdam, LazySGD
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode
from mesimp_gpu.touched_rows import MAX_PENDING
from reference import assert_close_to_reference, torch_step_on_rows


def row_sparse_grad(p: nn.Parameter, rows: torch.Tensor) -> None:
    """Give ``p`` a gradient that is non-zero only on ``rows``, and record them as meProp does."""
    g = torch.zeros_like(p)
    g[rows] = torch.randn(len(rows), *p.shape[1:], dtype=p.dtype) * 3
    p.grad = g
    touched_rows.mark(p, rows.reshape(1, -1))


def test_record_unites_backward_passes_and_clears():
    w = nn.Parameter(torch.zeros(10, 3))
    touched_rows.arm(w)
    touched_rows.mark(w, torch.tensor([[4, 1], [1, 7]]))
    touched_rows.mark(w, torch.tensor([2]))
    assert touched_rows.take(w).tolist() == [1, 2, 4, 7]
    assert touched_rows.take(w) is None  # re-armed, empty: no rows recorded, dense update
    touched_rows.mark(w, torch.tensor([6]))
    assert touched_rows.take(w).tolist() == [6]  # the re-armed record fills again
    touched_rows.mark(w, torch.tensor([3]))
    touched_rows.mark(w, None)
    touched_rows.mark(w, torch.tensor([5]))
    assert touched_rows.take(w) is None  # every row
    touched_rows.mark(w, torch.arange(10))
    assert touched_rows.take(w) is None  # all touched: dense is cheaper


def test_compiled_union_matches_torch_union(seed):
    try:
        cpu = load_backend("cpu")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    pending = [torch.randint(0, 37, (5, 3)), torch.tensor([36, 0, 0]), torch.randint(0, 37, (11,))]
    assert torch.equal(cpu.union_rows(pending, 37), union_rows(pending, 37))
    assert cpu.union_rows([torch.zeros(0, dtype=torch.long)], 4).numel() == 0
    with pytest.raises(RuntimeError, match="outside"):
        cpu.union_rows([torch.tensor([4])], 4)


def test_unarmed_weights_are_not_recorded():
    """Weights of dense optimizers: backward leaves nothing on them."""
    w = nn.Parameter(torch.zeros(10, 3))
    touched_rows.mark(w, torch.tensor([1, 2]))
    assert touched_rows.take(w) is None  # nothing was recorded (take arms it, so later marks count)
    touched_rows.mark(w, torch.tensor([1, 2]))
    assert touched_rows.take(w).tolist() == [1, 2]
    layer = MePropLinear(12, 30, MePropConfig(mode=MePropMode.TOPK, k=3, backend="reference"))
    torch.optim.Adam(layer.parameters())
    layer(torch.randn(4, 12)).sum().backward()
    assert touched_rows.take(layer.weight) is None


def test_lazy_optimizer_arms_its_parameters():
    p = nn.Parameter(torch.zeros(4, 2))
    LazySGD([p], lr=0.1)
    touched_rows.mark(p, torch.tensor([[1]]))
    assert touched_rows.take(p).tolist() == [1]


def test_record_stays_bounded_without_a_lazy_step():
    w = nn.Parameter(torch.zeros(50, 2))
    touched_rows.arm(w)
    for i in range(10 * MAX_PENDING):
        touched_rows.mark(w, torch.tensor([i % 40]))
    held: list[int] = []

    def counting_union(pending: list[torch.Tensor], n_rows: int) -> torch.Tensor:
        held.append(len(pending))
        return union_rows(pending, n_rows)

    assert touched_rows.take(w, counting_union).tolist() == list(range(40))
    assert held[0] <= MAX_PENDING + 1


@pytest.mark.parametrize("mode", [MePropMode.TOPK, MePropMode.UNIFIED, MePropMode.RANDOM])
def test_meprop_backward_records_the_rows_of_dw(seed, mode):
    layer = MePropLinear(12, 30, MePropConfig(mode=mode, k=3, backend="reference"))
    LazySGD(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 12)).pow(2).sum().backward()
    nonzero_rows = layer.weight.grad.abs().sum(dim=1).nonzero().squeeze(1)
    rows = touched_rows.take(layer.weight)
    assert set(nonzero_rows.tolist()) <= set(rows.tolist())
    assert rows.dtype == torch.int64 and len(rows) < 30
    assert touched_rows.take(layer.bias) is None  # biases are not recorded: dense update


def test_dense_meprop_records_every_row(seed):
    layer = MePropLinear(5, 6, MePropConfig(mode=MePropMode.TOPK, k=6, backend="reference"))
    LazySGD(layer.parameters(), lr=0.1)
    touched_rows.mark(layer.weight, torch.tensor([0]))  # one row so far ...
    layer(torch.randn(3, 5)).sum().backward()
    assert touched_rows.take(layer.weight) is None  # ... then the dense pass: every row


#: the row launchers of every backend with its own (cpu: compiled; triton: the kernels, in the
#: interpreter without CUDA) and the portable torch ops must agree with the same formulas
BACKENDS = ["cpu", "triton", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    try:
        load_backend(request.param)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    return request.param


@pytest.mark.parametrize("clip", [None, 1.0])
def test_lazy_sgd_is_sgd(seed, clip, backend):
    p = nn.Parameter(torch.randn(20, 4))
    opt = LazySGD([p], lr=0.1, clip_value=clip, backend=backend)
    for rows in ([3, 5, 11], [0, 5], [19]):
        before = p.detach().clone()
        row_sparse_grad(p, torch.tensor(rows))
        g = p.grad if clip is None else p.grad.clamp(-clip, clip)
        expected = before - 0.1 * g
        opt.step()
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lazy_adagrad_is_adagrad(seed, clip, backend, dtype):
    """Step by step equal to torch.optim.Adagrad on the same (clipped) row-sparse gradients."""
    p = nn.Parameter(torch.randn(20, 7, dtype=dtype))
    twin = nn.Parameter(p.detach().clone())
    opt = LazyAdagrad([p], lr=0.1, eps=1e-6, clip_value=clip, backend=backend)
    ref = torch.optim.Adagrad([twin], lr=0.1, eps=1e-6)
    for rows in ([3, 5, 11], [0, 5], [19], [5]):
        row_sparse_grad(p, torch.tensor(rows))
        twin.grad = p.grad.clone() if clip is None else p.grad.clamp(-clip, clip)
        opt.step()
        ref.step()
        torch.testing.assert_close(p.detach(), twin.detach())
    torch.testing.assert_close(opt.state[p]["sum"], ref.state[twin]["sum"])


def test_lazy_sgd_momentum_touches_only_recorded_rows(seed, backend):
    p = nn.Parameter(torch.randn(8, 3))
    opt = LazySGD([p], lr=0.5, momentum=0.9, backend=backend)
    buf = torch.zeros_like(p)
    expected = p.detach().clone()
    for rows in ([1, 2], [2, 6], [7]):
        row_sparse_grad(p, torch.tensor(rows))
        buf[rows] = 0.9 * buf[rows] + p.grad[rows]
        expected[rows] -= 0.5 * buf[rows]
        opt.step()
        torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_lazy_adam_formula(seed, clip, backend):
    """Moments decay and rows move only where touched; bias correction uses the parameter's step count."""
    p = nn.Parameter(torch.randn(9, 5))
    lr, (b1, b2), eps = 0.01, (0.9, 0.999), 1e-8
    opt = LazyAdam([p], lr=lr, betas=(b1, b2), eps=eps, clip_value=clip, backend=backend)
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


def test_without_a_record_lazy_adam_is_adam(seed, backend):
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    lazy, dense = LazyAdam([a, b], lr=0.01, backend=backend), torch.optim.Adam([a2, b2], lr=0.01)
    for _ in range(4):
        ga, gb = torch.randn(6, 4), torch.randn(6)
        a.grad, b.grad, a2.grad, b2.grad = ga.clone(), gb.clone(), ga.clone(), gb.clone()
        lazy.step()
        dense.step()
    torch.testing.assert_close(a.detach(), a2.detach())
    torch.testing.assert_close(b.detach(), b2.detach())


def test_lazy_sgd_trains_a_meprop_layer_like_sgd(seed, backend):
    torch.manual_seed(seed)
    lazy_layer = MePropLinear(16, 40, MePropConfig(mode=MePropMode.TOPK, k=2, backend="reference"))
    dense_layer = MePropLinear(16, 40, MePropConfig(mode=MePropMode.TOPK, k=2, backend="reference"))
    dense_layer.load_state_dict(lazy_layer.state_dict())
    lazy = LazySGD(lazy_layer.parameters(), lr=0.05, clip_value=5.0, backend=backend)
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
    opt = LazyAdam([w, t], lr=0.1, backend="cpu")
    before_w, before_t = w.detach().clone(), t.detach().clone()
    row_sparse_grad(w, torch.tensor([2, 9]))
    t.grad = torch.ones_like(t)
    opt.step()
    changed = (w.detach() != before_w).any(dim=1)
    assert changed.nonzero().squeeze(1).tolist() == [2, 9]
    torch.testing.assert_close(t.detach(), before_t - 0.1)  # Adam's first step moves by lr * sign(g)


#: name -> (lazy optimizer for (params, backend), torch.optim twin for params, state keys)
OPTIMIZERS = {
    "sgd-momentum": (lambda ps, b: LazySGD(ps, lr=0.1, momentum=0.9, clip_value=0.5, backend=b),
                     lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), ("momentum_buffer",)),
    "adam": (lambda ps, b: LazyAdam(ps, lr=0.01, clip_value=0.5, backend=b),
             lambda ps: torch.optim.Adam(ps, lr=0.01), ("exp_avg", "exp_avg_sq")),
    "adagrad": (lambda ps, b: LazyAdagrad(ps, lr=0.1, eps=1e-6, clip_value=0.5, backend=b),
                lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-6), ("sum",)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_touched_rows_step_like_torch_optim(seed, backend, name):
    """Step by step, other rows each step: the touched rows move as torch.optim moves them from their own
    state, with the clipped gradient and the parameter's step count; the other rows keep weights and state."""
    make_lazy, make_torch, keys = OPTIMIZERS[name]
    p = nn.Parameter(torch.randn(13, 2, 5))  # three dims: the rows are those of dim 0
    opt = make_lazy([p], backend)
    expected = p.detach().clone()
    state = {key: torch.zeros_like(p) for key in keys}
    for step, rows in enumerate(([0, 4, 12], [4, 8, 2], [1], [4, 5, 6, 7, 8, 9, 10, 11]), start=1):
        row_sparse_grad(p, torch.tensor(rows))
        expected[rows] = torch_step_on_rows(make_torch, expected, p.grad.clamp(-0.5, 0.5), rows, state, step)
        opt.step()
        assert_close_to_reference(p, expected, torch.float32)  # against torch.optim's float32 step
        for key in keys:
            assert_close_to_reference(opt.state[p][key], state[key], torch.float32)


def test_each_device_resolves_its_backend_once(monkeypatch: pytest.MonkeyPatch, seed):
    """Many steps over several parameters look the backend up once, for the one device in use."""
    calls: list[tuple[str, str]] = []
    real = backends.get_backend

    def counting(name: str = "auto", device: torch.device | str = "cpu"):
        calls.append((name, torch.device(device).type))
        return real(name, device)

    monkeypatch.setattr(backends, "get_backend", counting)
    params = [nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(4, 6))]
    opt = LazyAdam(params, lr=0.01)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert calls == [("auto", "cpu")]


def test_unknown_or_unavailable_backend_fails_at_construction(monkeypatch: pytest.MonkeyPatch):
    p = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="unknown backend"):
        LazySGD(p, lr=0.1, backend="nope")
    monkeypatch.setitem(backends._loaded, "cpu", BackendUnavailable("backend 'cpu' cannot build here"))
    with pytest.raises(BackendUnavailable, match="cannot build"):
        LazySGD(p, lr=0.1, backend="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("make", [LazySGD, LazyAdam, LazyAdagrad], ids=["sgd", "adam", "adagrad"])
def test_lazy_optimizers_on_cuda_use_the_triton_kernels(seed, make):
    """``auto`` on CUDA parameters: the Triton row kernels, equal to the portable torch ops within float32 rounding."""
    torch.manual_seed(seed)
    config = MePropConfig(MePropMode.TOPK, 20, "auto")
    layers = {name: MePropLinear(784, 500, config).cuda() for name in ("auto", "torch")}
    layers["torch"].load_state_dict(layers["auto"].state_dict())
    opts = {name: make(layer.parameters(), lr=0.01, clip_value=5.0, backend=name) for name, layer in layers.items()}
    assert opts["auto"].backend_for(layers["auto"].weight.device).name == "triton"
    for _ in range(3):
        x = torch.randn(100, 784, device="cuda")
        for name, layer in layers.items():
            opts[name].zero_grad()
            layer(x).pow(2).sum().backward()
            opts[name].step()
    for a, b in zip(layers["auto"].parameters(), layers["torch"].parameters()):
        # three float32 steps through 784-term sums, not yet measured on a GPU
        assert_close_to_reference(a, b, torch.float32, gpu=True)


"""Mixed precision: meProp layers under ``torch.autocast`` and with half-precision parameters, on every backend.

What a dense layer does under autocast is the reference: the products run on ``x`` and ``W`` rounded to
autocast's dtype, the results are in that dtype, and autograd casts the gradients back to the inputs'
and the parameters' dtypes. The linear layer is checked against that computed by hand in float64 (the
selection by the rule on the gradient as it arrives, in the compute dtype); the LSTM's dense path against
an autograd LSTM under the same autocast, and its sparse modes on every backend against the reference
backend (the recurrence is the same code for every backend, so both select from the same ``dz``). CUDA
cases are marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mesimp_gpu import touched_rows
from mesimp_gpu.backends import REGISTRY, BackendUnavailable, load_backend
from mesimp_gpu.backends.reference import topk_mask
from mesimp_gpu.lstm import GateSelection, MePropLSTM
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode, random_indices
from reference import assert_close_to_reference, gradient, with_ties
from test_lstm import reference_direction

BACKENDS = list(REGISTRY)
GPU = pytest.mark.gpu

#: (device, autocast dtype): bfloat16 on the CPU (what CPU autocast supports), both half types on CUDA
AUTOCAST = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=GPU),
    pytest.param("cuda", torch.bfloat16, marks=GPU),
]
#: (device, parameter dtype) for layers stored in half precision, without autocast
HALF_PARAMETERS = [
    ("cpu", torch.bfloat16),
    ("cpu", torch.float16),
    pytest.param("cuda", torch.float16, marks=GPU),
    pytest.param("cuda", torch.bfloat16, marks=GPU),
]


def backend_or_skip(name: str, device: str) -> None:
    try:
        load_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    if device == "cpu" and name == "cupy":
        pytest.skip("backend 'cupy' takes CUDA tensors only")


def kept_mask(g: Tensor, mode: MePropMode, k: int, seed: int) -> Tensor:
    """The meProp rule's kept entries of ``g`` (``[B, out]``, the compute dtype) as a bool mask, from the
    float64 reference selection; ``random`` replays the layer's draws from ``seed``."""
    batch, width = g.shape
    if mode is MePropMode.DENSE or k >= width:
        return torch.ones(g.shape, dtype=torch.bool)
    if mode is MePropMode.TOPK:
        return topk_mask(g, k)
    if mode is MePropMode.UNIFIED:  # scores accumulated in float32, as every backend does for half types
        scores = g.float().abs().sum(dim=0, keepdim=True)
        return topk_mask(scores, k).expand(batch, width)
    torch.manual_seed(seed)
    idx = random_indices(batch, width, k, g.device)
    return torch.zeros(g.shape, dtype=torch.bool).scatter_(1, idx.cpu(), True)


def check_linear(layer: MePropLinear, x: Tensor, compute: torch.dtype, autocast: bool, seed: int) -> None:
    """Forward and backward of ``layer`` on ``x`` (autocast to ``compute`` when ``autocast``) against the dense
    layer's maths in float64 on the operands rounded to ``compute``."""
    device = x.device.type
    mode, k = layer.config.mode, layer.config.k
    x = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=compute, enabled=autocast):
        y = layer(x)
    assert y.dtype == compute
    g = with_ties(gradient(*y.shape, "halves", dtype=compute, device=x.device))
    torch.manual_seed(seed)  # random mode: the draws kept_mask replays
    y.backward(g)

    xc, wc, bc = (t.detach().to(compute).cpu().double() for t in (x, layer.weight, layer.bias))
    g64 = g.cpu().double()
    g_k = torch.where(kept_mask(g.cpu(), mode, k, seed), g64, 0.0)
    expected = {"y": xc @ wc.t() + bc, "dx": g_k @ wc, "dW": g_k.t() @ xc, "db": g64.sum(dim=0)}
    got = {"y": y, "dx": x.grad, "dW": layer.weight.grad, "db": layer.bias.grad}
    owners = {"y": y, "dx": x, "dW": layer.weight, "db": layer.bias}
    for name, value in got.items():
        assert value.dtype == owners[name].dtype, f"{name} is {value.dtype}, its tensor is {owners[name].dtype}"
        rounded = value.detach().to(compute)
        # computed in the compute dtype, as the dense layer's products are: no digits beyond it
        assert torch.equal(rounded.to(value.dtype), value.detach()), f"{name} carries digits beyond {compute}"
        assert_close_to_reference(rounded, expected[name], compute, msg=f"{name} differs (seed {seed})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MePropMode))
@pytest.mark.parametrize(("device", "compute"), AUTOCAST)
def test_linear_under_autocast_computes_as_the_dense_layer(backend, mode, device, compute, seed) -> None:
    backend_or_skip(backend, device)
    layer = MePropLinear(9, 13, MePropConfig(mode, 4, backend), track_hits=True).to(device)
    with torch.no_grad():
        layer.bias.normal_()
    check_linear(layer, torch.randn(6, 9, device=device), compute, autocast=True, seed=seed)
    assert int(layer.hits.sum()) == 6 * (13 if mode is MePropMode.DENSE else 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MePropMode))
@pytest.mark.parametrize(("device", "dtype"), HALF_PARAMETERS)
def test_linear_with_half_parameters(backend, mode, device, dtype, seed) -> None:
    backend_or_skip(backend, device)
    layer = MePropLinear(9, 13, MePropConfig(mode, 4, backend)).to(device, dtype)
    with torch.no_grad():
        layer.bias.normal_()
    check_linear(layer, torch.randn(6, 9, device=device, dtype=dtype), dtype, autocast=False, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unified_scores_of_half_gradients_are_not_rounded(backend, dtype) -> None:
    """Column 1's score exceeds column 0's by 2^-12, less than half an ulp of either dtype at 1: summed in
    the gradient's dtype the two would tie and column 0 (the lower index) would win."""
    backend_or_skip(backend, "cpu")
    layer = MePropLinear(3, 2, MePropConfig(MePropMode.UNIFIED, 1, backend), track_hits=True).to(dtype)
    g = torch.tensor([[1.0, 1.0], [0.0, 2.0**-12]], dtype=dtype)
    layer(torch.randn(2, 3, dtype=dtype)).backward(g)
    assert layer.hits.tolist() == [0, 2]


def test_autocast_input_of_another_dtype_gets_its_own_dtype_back(seed) -> None:
    """A bfloat16 activation from an earlier autocast layer, float32 parameters: dx in bfloat16, dW in float32."""
    layer = MePropLinear(7, 5, MePropConfig(MePropMode.TOPK, 2, "torch"))
    x = torch.randn(4, 7).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert (x.grad.dtype, layer.weight.grad.dtype, layer.bias.grad.dtype) == (torch.bfloat16,) + (torch.float32,) * 2


def test_touched_rows_reach_the_parameter_under_autocast(seed) -> None:
    """The lazy optimizers' records are kept on the float32 Parameter, not on autocast's copy of it."""
    layer = MePropLinear(7, 10, MePropConfig(MePropMode.TOPK, 2, "torch"))
    touched_rows.arm(layer.weight)
    g = gradient(3, 10, "halves", dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 7))
    y.backward(g)
    assert touched_rows.take(layer.weight).tolist() == topk_mask(g, 2).any(dim=0).nonzero().flatten().tolist()


def test_backward_inside_the_autocast_region(seed) -> None:
    """A backward pass started inside the autocast region gives what it gives outside."""
    layer = MePropLinear(7, 5, MePropConfig(MePropMode.UNIFIED, 2, "torch"))
    x = torch.randn(4, 7)
    grads = []
    for inside in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(x).float().square().sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append(layer.weight.grad.clone())
    assert torch.equal(*grads)


# ------------------------------------------------------------------------------------------------- LSTM

BATCH, STEPS, FEATURES, HIDDEN = 3, 5, 4, 6


def lstm_inputs(device: str, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Input ``[B, T, I]``, lengths ``[B]`` (the first full) and output weights ``[B, T, H]`` for a loss."""
    x = torch.randn(BATCH, STEPS, FEATURES, device=device, dtype=dtype)
    lengths = torch.tensor([STEPS, 2, 4], device=device)
    return x, lengths, torch.randn(BATCH, STEPS, HIDDEN, device=device)


def lstm_grads(lstm: MePropLSTM, x: Tensor, lengths: Tensor, weights: Tensor, compute: torch.dtype | None) -> list[Tensor]:
    """``dx, dW_x, dW_h, db`` of ``sum(weights * lstm(x))``, under autocast to ``compute`` unless None."""
    x = x.clone().requires_grad_(True)
    lstm.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=compute or torch.bfloat16, enabled=compute is not None):
        out = lstm(x, lengths=lengths)
    if compute is not None:
        assert out.dtype == compute
    (out.float() * weights).sum().backward()
    d = lstm.directions[0]
    return [x.grad, d.weight_ih.grad, d.weight_hh.grad, d.bias.grad]


@pytest.mark.parametrize(("device", "compute"), AUTOCAST)
def test_dense_lstm_under_autocast_matches_autograd_under_autocast(device, compute, seed) -> None:
    lstm = MePropLSTM(FEATURES, HIDDEN, MePropConfig(MePropMode.DENSE, 1, "torch")).to(device)
    x, lengths, weights = lstm_inputs(device)
    got = lstm_grads(lstm, x, lengths, weights, compute)

    d = lstm.directions[0]
    params = [p.detach().clone().requires_grad_(True) for p in (d.weight_ih, d.weight_hh, d.bias)]
    x_ref = x.transpose(0, 1).clone().requires_grad_(True)
    mask = (torch.arange(STEPS, device=device) < lengths.unsqueeze(1)).t()
    with torch.autocast(device, dtype=compute):
        # the autograd LSTM computes in the compute dtype from its first product on, as ours does
        out = reference_direction(x_ref, mask, *(p.to(compute) for p in params), False, MePropMode.DENSE, 1,
                                  GateSelection.ALL, [])
    (out.float() * weights.transpose(0, 1)).sum().backward()
    for name, ours, ref in zip(("dx", "dW_x", "dW_h", "db"), got, [x_ref.grad.transpose(0, 1), *(p.grad for p in params)]):
        assert ours.dtype == torch.float32
        # both round to the compute dtype at every op, in different orders, and the weight gradients sum
        # T * B rows of such roundings (worst over 20 seeds without terms: 1.4 for db, 0.64 for dW_x)
        assert_close_to_reference(ours.to(compute), ref, compute, terms=STEPS * BATCH,
                                  msg=f"{name} differs (seed {seed})")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize(("mode", "selection", "k"), [
    (MePropMode.TOPK, GateSelection.PER_GATE, 2),
    (MePropMode.TOPK, GateSelection.ALL, 5),
    (MePropMode.UNIFIED, GateSelection.PER_GATE, 2),
])
@pytest.mark.parametrize(("device", "compute", "autocast"), [
    ("cpu", torch.bfloat16, True),
    ("cpu", torch.bfloat16, False),
    ("cpu", torch.float16, False),
    pytest.param("cuda", torch.float16, True, marks=GPU),
    pytest.param("cuda", torch.bfloat16, True, marks=GPU),
    pytest.param("cuda", torch.float16, False, marks=GPU),
])
def test_sparse_lstm_in_half_precision_matches_the_reference_backend(
    backend, mode, selection, k, device, compute, autocast, seed
) -> None:
    backend_or_skip(backend, device)
    if backend == "triton" and device == "cpu":
        pytest.skip("a whole sequence is too slow in Triton's interpreter")
    param_dtype = torch.float32 if autocast else compute
    lstms = {}
    for name in ("reference", backend):
        torch.manual_seed(seed)
        lstms[name] = MePropLSTM(FEATURES, HIDDEN, MePropConfig(mode, k, name), selection=selection,
                                 track_hits=True).to(device, param_dtype)
    x, lengths, weights = lstm_inputs(device, param_dtype)
    want = lstm_grads(lstms["reference"], x, lengths, weights, compute if autocast else None)
    got = lstm_grads(lstms[backend], x, lengths, weights, compute if autocast else None)
    for name, ours, ref in zip(("dx", "dW_x", "dW_h", "db"), got, want):
        assert ours.dtype == ref.dtype == param_dtype
        assert_close_to_reference(ours.to(compute), ref, compute, msg=f"{name} differs (seed {seed})")
    assert torch.equal(lstms[backend].directions[0].hits, lstms["reference"].directions[0].hits)

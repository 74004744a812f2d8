"""MePropLSTM against a float64 autograd reference, dense equivalence with nn.LSTM, and meSimp pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from mesimp_gpu import touched_rows
from mesimp_gpu.backends import BackendUnavailable, load_backend
from mesimp_gpu.backends.reference import topk_mask
from mesimp_gpu.lazy_optim import LazyAdagrad, LazySGD
from mesimp_gpu.lstm import GATES, GateSelection, HitCounting, MePropLSTM
from mesimp_gpu.meprop import MePropConfig, MePropMode, random_indices
from reference import assert_close_to_reference

F64 = torch.float64


def reference_gate_mask(
    g: Tensor, mode: MePropMode, k: int, selection: GateSelection
) -> Tensor:
    """Float mask ``[B, 4H]`` of the entries the meProp rule keeps in ``g`` (dense masks, float64 sort)."""
    batch, width = g.shape
    hidden = width // GATES
    per_gate = selection is GateSelection.PER_GATE
    if mode is MePropMode.DENSE or k >= (hidden if per_gate else width):
        return torch.ones_like(g)
    if mode is MePropMode.RANDOM:
        rows, cols = (batch * GATES, hidden) if per_gate else (batch, width)
        idx = random_indices(rows, cols, k, g.device)
        return torch.zeros(rows, cols, dtype=g.dtype).scatter_(1, idx, 1.0).view(batch, width)
    if mode is MePropMode.UNIFIED:
        scores = g.abs().sum(dim=0)
        keep = topk_mask(scores.view(GATES, hidden) if per_gate else scores.view(1, width), k)
        return keep.reshape(1, width).expand(batch, width).to(g.dtype)
    return topk_mask(g.view(batch * GATES, hidden) if per_gate else g, k).view(batch, width).to(g.dtype)


def reference_direction(
    x: Tensor, mask: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor, reverse: bool,
    mode: MePropMode, k: int, selection: GateSelection, masks_out: list[Tensor], sparse_bias: bool = False,
) -> Tensor:
    """Step-by-step LSTM with autograd; a hook multiplies each ``dz_t`` reaching the products by the keep mask.

    ``x`` ``[T, B, I]``, ``mask`` ``[T, B]``; the keep masks of every step are appended to ``masks_out``
    (in backward order) so the caller can count hits.
    """
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    h = x.new_zeros(batch, hidden)
    c = x.new_zeros(batch, hidden)
    outs: list[Tensor | None] = [None] * steps

    def hook(g: Tensor, valid: Tensor) -> Tensor:
        keep = reference_gate_mask(g, mode, k, selection)
        masks_out.append(keep[valid])
        return g * keep

    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        products = x[t] @ w_ih.t() + h @ w_hh.t()
        z = products + bias
        # the mask sits before the bias (dense bias gradient, as in the linear layer) unless sparse_bias
        (z if sparse_bias else products).register_hook(lambda g, valid=mask[t]: hook(g, valid))
        i, f, g, o = z.chunk(GATES, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c + i * g
        h_new = o * c_new.tanh()
        m = mask[t].unsqueeze(1)
        outs[t] = torch.where(m, h_new, 0.0)
        h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
    return torch.stack(outs)  # type: ignore[arg-type]


def make_inputs(batch: int, steps: int, features: int) -> tuple[Tensor, Tensor]:
    """Random float64 input ``[B, T, I]`` and lengths ``[B]`` with the first example full length."""
    x = torch.randn(batch, steps, features, dtype=torch.float64)
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0] = steps
    return x, lengths


CASES = [
    (MePropMode.TOPK, GateSelection.ALL, 3),
    (MePropMode.TOPK, GateSelection.PER_GATE, 2),
    (MePropMode.UNIFIED, GateSelection.ALL, 4),
    (MePropMode.UNIFIED, GateSelection.PER_GATE, 1),
    (MePropMode.RANDOM, GateSelection.ALL, 5),
    (MePropMode.RANDOM, GateSelection.PER_GATE, 3),
    (MePropMode.DENSE, GateSelection.ALL, 1),
]


# random mode draws indices in backward order; autograd's order between the two directions is its own
# business, so the bidirectional random case cannot replay the same draws in the reference
GRADIENT_CASES = [
    (mode, selection, k, bidirectional)
    for mode, selection, k in CASES
    for bidirectional in (False, True)
    if not (bidirectional and mode is MePropMode.RANDOM)
]


# the Triton and CuPy backends need a GPU for a whole-sequence test (the interpreter is too slow)
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize(("mode", "selection", "k", "bidirectional"), GRADIENT_CASES)
def test_gradients_match_masked_reference(
    seed: int, backend: str, bidirectional: bool, mode: MePropMode, selection: GateSelection, k: int
) -> None:
    try:
        load_backend(backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    batch, steps, features, hidden = 3, 5, 4, 6
    lstm = MePropLSTM(
        features, hidden, MePropConfig(mode=mode, k=k, backend=backend), bidirectional=bidirectional,
        selection=selection, counting=HitCounting.ANY, track_hits=True,
    ).double()
    x, lengths = make_inputs(batch, steps, features)
    mask = torch.arange(steps) < lengths.unsqueeze(1)
    weights = torch.randn(batch, steps, lstm.output_size, dtype=torch.float64)

    x_ours = x.clone().requires_grad_(True)
    rng = torch.get_rng_state()
    (lstm(x_ours, lengths=lengths) * weights).sum().backward()

    torch.set_rng_state(rng)  # random mode: the reference draws the same indices in the same order
    x_ref = x.clone().transpose(0, 1).requires_grad_(True)
    ref_params = [[p.detach().clone().requires_grad_(True) for p in (d.weight_ih, d.weight_hh, d.bias)]
                  for d in lstm.directions]
    kept_masks: list[list[Tensor]] = [[] for _ in lstm.directions]
    outs = [
        reference_direction(x_ref, mask.t(), *params, d.reverse, mode, k, selection, kept)
        for d, params, kept in zip(lstm.directions, ref_params, kept_masks)
    ]
    # one backward per direction so the hooks (and random draws) run in the same order as ours
    for out, block in zip(outs, weights.transpose(0, 1).split(hidden, dim=2)):
        (out * block).sum().backward()

    assert_close_to_reference(x_ours.grad, x_ref.grad.transpose(0, 1), F64)
    for d, params, kept in zip(lstm.directions, ref_params, kept_masks):
        for ours, ref in zip((d.weight_ih, d.weight_hh, d.bias), params):
            assert_close_to_reference(ours.grad, ref.grad, F64)
        touched = torch.cat(kept).view(-1, GATES, hidden).amax(dim=1)  # any gate of the unit kept
        assert d.hits.tolist() == touched.sum(dim=0).long().tolist()
        assert d.refer == int(lengths.sum())


@pytest.mark.parametrize("bidirectional", [False, True])
def test_mask_with_holes_carries_state(seed: int, bidirectional: bool) -> None:
    """A mask that is not a prefix: state and its gradient pass through the masked steps."""
    batch, steps, features, hidden, k = 3, 6, 4, 5, 3
    lstm = MePropLSTM(features, hidden, MePropConfig(k=k, backend="torch"), bidirectional=bidirectional,
                      selection=GateSelection.ALL).double()
    x = torch.randn(batch, steps, features, dtype=torch.float64)
    mask = torch.rand(batch, steps) < 0.6
    mask[:, 0] = mask[:, -1] = True
    mask[:, 2] = False
    weights = torch.randn(batch, steps, lstm.output_size, dtype=torch.float64)
    x_ours = x.clone().requires_grad_(True)
    (lstm(x_ours, mask=mask) * weights).sum().backward()

    x_ref = x.clone().transpose(0, 1).requires_grad_(True)
    for d, block in zip(lstm.directions, weights.transpose(0, 1).split(hidden, dim=2)):
        params = [p.detach().clone().requires_grad_(True) for p in (d.weight_ih, d.weight_hh, d.bias)]
        out = reference_direction(x_ref, mask.t(), *params, d.reverse, MePropMode.TOPK, k, GateSelection.ALL, [])
        (out * block).sum().backward()
        for ours, ref in zip((d.weight_ih, d.weight_hh, d.bias), params):
            assert_close_to_reference(ours.grad, ref.grad, F64)
    assert_close_to_reference(x_ours.grad, x_ref.grad.transpose(0, 1), F64)


@pytest.mark.parametrize("selection", list(GateSelection))
def test_sparse_bias_uses_kept_entries_only(seed: int, selection: GateSelection) -> None:
    features, hidden, k = 3, 5, 2
    config = MePropConfig(mode=MePropMode.TOPK, k=k, backend="torch", sparse_bias=True)
    lstm = MePropLSTM(features, hidden, config, selection=selection).double()
    x, lengths = make_inputs(3, 4, features)
    mask = torch.arange(4) < lengths.unsqueeze(1)
    weights = torch.randn(3, 4, hidden, dtype=torch.float64)
    (lstm(x, lengths=lengths) * weights).sum().backward()
    d = lstm.directions[0]
    params = [p.detach().clone().requires_grad_(True) for p in (d.weight_ih, d.weight_hh, d.bias)]
    out = reference_direction(x.transpose(0, 1), mask.t(), *params, False, MePropMode.TOPK, k, selection, [],
                              sparse_bias=True)
    (out * weights.transpose(0, 1)).sum().backward()
    for ours, ref in zip((d.weight_ih, d.weight_hh, d.bias), params):
        assert_close_to_reference(ours.grad, ref.grad, F64)


@pytest.mark.parametrize("k", [12, 16])  # 16 = 4H: the dense path
@pytest.mark.parametrize("counting", list(HitCounting))
def test_nonzero_hits_skip_units_without_gradient(seed: int, k: int, counting: HitCounting) -> None:
    """Units 2 and 3 feed nothing (zero W_h columns, zero readout): their dz is exactly zero."""
    hidden = 4
    x, lengths = make_inputs(3, 4, 3)
    readout = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    hits = []
    for nonzero in (False, True):
        config = MePropConfig(mode=MePropMode.TOPK, k=k, backend="torch", nonzero_hits=nonzero)
        lstm = MePropLSTM(3, hidden, config, selection=GateSelection.ALL, counting=counting, track_hits=True).double()
        with torch.no_grad():
            lstm.directions[0].weight_hh[:, 2:] = 0.0
        (lstm(x, lengths=lengths) * readout).sum().backward()
        hits.append(lstm.directions[0].hits.tolist())
    assert hits[1][2:] == [0, 0] and hits[0][2:] != [0, 0]
    assert all(h > 0 for h in hits[1][:2])


def test_each_gate_counting_counts_every_selected_entry(seed: int) -> None:
    hidden, k = 5, 2
    lstm = MePropLSTM(3, hidden, MePropConfig(k=k, backend="reference"), selection=GateSelection.PER_GATE,
                      counting=HitCounting.EACH_GATE, track_hits=True).double()
    x, lengths = make_inputs(4, 3, 3)
    lstm(x, lengths=lengths).sum().backward()
    d = lstm.directions[0]
    assert int(d.hits.sum()) == GATES * k * int(lengths.sum())


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("selection", list(GateSelection))
def test_full_k_equals_nn_lstm(seed: int, bidirectional: bool, selection: GateSelection) -> None:
    """k covering the whole row is dense back propagation: same outputs and gradients as ``nn.LSTM``."""
    batch, steps, features, hidden = 4, 6, 3, 5
    k = hidden if selection is GateSelection.PER_GATE else GATES * hidden
    lstm = MePropLSTM(features, hidden, MePropConfig(k=k, backend="torch"), bidirectional=bidirectional,
                      selection=selection).double()
    torch_lstm = nn.LSTM(features, hidden, batch_first=True, bidirectional=bidirectional).double()
    with torch.no_grad():
        for suffix, d in zip(("", "_reverse"), lstm.directions):
            getattr(torch_lstm, f"weight_ih_l0{suffix}").copy_(d.weight_ih)
            getattr(torch_lstm, f"weight_hh_l0{suffix}").copy_(d.weight_hh)
            getattr(torch_lstm, f"bias_ih_l0{suffix}").copy_(d.bias)
            getattr(torch_lstm, f"bias_hh_l0{suffix}").zero_()
    x, lengths = make_inputs(batch, steps, features)
    weights = torch.randn(batch, steps, lstm.output_size, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)

    out1 = lstm(x1, lengths=lengths)
    packed = nn.utils.rnn.pack_padded_sequence(x2, lengths, batch_first=True, enforce_sorted=False)
    out2, _ = nn.utils.rnn.pad_packed_sequence(torch_lstm(packed)[0], batch_first=True, total_length=steps)
    (out1 * weights).sum().backward()
    (out2 * weights).sum().backward()

    assert_close_to_reference(out1, out2, F64)
    assert_close_to_reference(x1.grad, x2.grad, F64)
    for suffix, d in zip(("", "_reverse"), lstm.directions):
        assert_close_to_reference(d.weight_ih.grad, getattr(torch_lstm, f"weight_ih_l0{suffix}").grad, F64)
        assert_close_to_reference(d.weight_hh.grad, getattr(torch_lstm, f"weight_hh_l0{suffix}").grad, F64)
        assert_close_to_reference(d.bias.grad, getattr(torch_lstm, f"bias_ih_l0{suffix}").grad, F64)


@pytest.mark.parametrize("selection", list(GateSelection))
def test_full_k_is_bitwise_dense_mode(seed: int, selection: GateSelection) -> None:
    """k covering the row takes the dense path: bit-identical to mode dense (float32)."""
    hidden = 5
    k = hidden if selection is GateSelection.PER_GATE else GATES * hidden
    x, lengths = make_inputs(3, 4, 3)
    x = x.float()
    grads = []
    for mode in (MePropMode.DENSE, MePropMode.TOPK):
        torch.manual_seed(seed)
        lstm = MePropLSTM(3, hidden, MePropConfig(mode=mode, k=k, backend="torch"), selection=selection)
        xi = x.clone().requires_grad_(True)
        lstm(xi, lengths=lengths).sum().backward()
        grads.append([xi.grad, *(p.grad for p in lstm.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_sparse_gradient_differs_from_dense(seed: int) -> None:
    """Guards the tests above against a sparsification that silently does nothing."""
    x, lengths = make_inputs(2, 4, 3)
    grads = []
    for k in (1, 4 * 6):
        torch.manual_seed(seed)
        lstm = MePropLSTM(3, 6, MePropConfig(k=k, backend="torch"), selection=GateSelection.ALL).double()
        lstm(x, lengths=lengths).sum().backward()
        grads.append(lstm.directions[0].weight_hh.grad)
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("mode", [MePropMode.TOPK, MePropMode.UNIFIED, MePropMode.DENSE])
def test_backward_records_the_touched_rows_of_both_weights(seed: int, mode: MePropMode) -> None:
    """Every row of W_x and W_h with a non-zero gradient is recorded (all rows in dense mode); the bias is not."""
    lstm = MePropLSTM(3, 6, MePropConfig(mode=mode, k=1, backend="torch"), bidirectional=True)
    for p in lstm.parameters():
        touched_rows.arm(p)
    x, lengths = make_inputs(2, 4, 3)
    lstm(x.float(), lengths=lengths).sum().backward()
    for d in lstm.directions:
        for weight in (d.weight_ih, d.weight_hh):
            rows = touched_rows.take(weight)
            if mode is MePropMode.DENSE:
                assert rows is None
            else:
                nonzero = weight.grad.abs().sum(dim=1).nonzero().squeeze(1)
                assert set(nonzero.tolist()) <= set(rows.tolist()) and len(rows) < GATES * 6
        assert touched_rows.take(d.bias) is None


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    ("lazy", "dense"),
    [
        (lambda ps: LazySGD(ps, lr=0.1, clip_value=1.0), lambda ps: torch.optim.SGD(ps, lr=0.1)),
        (lambda ps: LazyAdagrad(ps, lr=0.1, eps=1e-6, clip_value=1.0),
         lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-6)),
    ],
    ids=["sgd", "adagrad"],
)
def test_lazy_optimizers_train_the_lstm_like_dense_ones(seed: int, backend: str, lazy, dense) -> None:
    """SGD and AdaGrad do nothing to rows with zero gradient, so updating only the recorded rows is exact."""
    try:
        load_backend(backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    config = MePropConfig(mode=MePropMode.TOPK, k=2, backend=backend)
    lstms = [MePropLSTM(3, 6, config, bidirectional=True).double() for _ in range(2)]
    lstms[1].load_state_dict(lstms[0].state_dict())
    opts = [lazy(lstms[0].parameters()), dense(lstms[1].parameters())]
    for _ in range(3):
        x, lengths = make_inputs(3, 4, 3)
        for lstm, opt in zip(lstms, opts):
            opt.zero_grad()
            (lstm(x, lengths=lengths) ** 2).sum().backward()
            if opt is opts[1]:
                nn.utils.clip_grad_value_(lstm.parameters(), 1.0)
            opt.step()
    for a, b in zip(lstms[0].parameters(), lstms[1].parameters()):
        assert_close_to_reference(a, b, F64)


def test_input_without_gradient(seed: int) -> None:
    """An input that needs no gradient (data fed straight in): the backward pass skips dx, weights still learn."""
    lstm = MePropLSTM(3, 5, MePropConfig(mode=MePropMode.TOPK, k=2, backend="torch")).double()
    x, lengths = make_inputs(2, 4, 3)
    lstm(x, lengths=lengths).sum().backward()
    reference = MePropLSTM(3, 5, MePropConfig(mode=MePropMode.TOPK, k=2, backend="torch")).double()
    reference.load_state_dict(lstm.state_dict())
    reference(x.clone().requires_grad_(True), lengths=lengths).sum().backward()
    for a, b in zip(lstm.parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad)


def masked_copy(lstm: MePropLSTM, head: nn.Linear, keeps: list[Tensor]) -> tuple[MePropLSTM, nn.Linear]:
    """The C# reference's view of pruning: same sizes, pruned units' outgoing weights zeroed."""
    lstm2, head2 = copy.deepcopy(lstm), copy.deepcopy(head)
    with torch.no_grad():
        for keep, d in zip(keeps, lstm2.directions):
            d.weight_hh[:, ~keep] = 0.0
        head2.weight[:, ~torch.cat(keeps)] = 0.0
    return lstm2, head2


@pytest.mark.parametrize("bidirectional", [False, True])
def test_prune_keeps_surviving_outputs(seed: int, bidirectional: bool) -> None:
    features, hidden, classes = 3, 7, 4
    lstm = MePropLSTM(features, hidden, MePropConfig(k=2, backend="torch"), bidirectional=bidirectional,
                      track_hits=True).double()
    head = nn.Linear(lstm.output_size, classes).double()
    optimizer = torch.optim.Adam([*lstm.parameters(), *head.parameters()], lr=1e-3)
    x, lengths = make_inputs(3, 5, features)
    head(lstm(x, lengths=lengths)).sum().backward()
    optimizer.step()

    keeps = [torch.rand(hidden) < 0.5 for _ in lstm.directions]
    for keep in keeps:
        keep[0] = True
    masked_lstm, masked_head = masked_copy(lstm, head, keeps)
    old_state = {name: {k: v.clone() for k, v in optimizer.state[p].items()}
                 for name, p in lstm.directions[-1].named_parameters()}

    lstm.prune_units_(keeps, head, optimizer)
    assert lstm.output_size == int(sum(k.sum() for k in keeps)) == head.in_features == head.weight.shape[1]
    with torch.no_grad():
        assert_close_to_reference(head(lstm(x, lengths=lengths)), masked_head(masked_lstm(x, lengths=lengths)), F64)
        full = masked_lstm(x, lengths=lengths)
        assert_close_to_reference(lstm(x, lengths=lengths), full[:, :, torch.cat(keeps)], F64)

    rows = keeps[-1].repeat(GATES)
    state = optimizer.state[lstm.directions[-1].weight_hh]
    torch.testing.assert_close(state["exp_avg"], old_state["weight_hh"]["exp_avg"][rows][:, keeps[-1]])
    torch.testing.assert_close(optimizer.state[lstm.directions[-1].bias]["exp_avg_sq"],
                               old_state["bias"]["exp_avg_sq"][rows])
    # the sliced state fits the sliced parameters: training goes on
    optimizer.zero_grad()
    head(lstm(x, lengths=lengths)).sum().backward()
    optimizer.step()


def test_mesimp_prune_uses_hit_threshold() -> None:
    lstm = MePropLSTM(2, 5, MePropConfig(k=1), track_hits=True)
    head = nn.Linear(5, 3)
    d = lstm.directions[0]
    d.hits.copy_(torch.tensor([10, 0, 3, 4, 9]))
    d.refer = 40
    kept_rows = head.weight[:, [0, 3, 4]].detach().clone()
    assert lstm.mesimp_prune_(0.1, head) == [3]  # floor(40 * 0.1) = 4: units with >= 4 hits (0, 3, 4) stay
    torch.testing.assert_close(head.weight.detach(), kept_rows)
    assert d.hits.tolist() == [0, 0, 0] and d.refer == 0


def test_mesimp_prune_bidirectional_sizes_differ() -> None:
    lstm = MePropLSTM(2, 4, MePropConfig(k=1), bidirectional=True, track_hits=True)
    head = nn.Linear(8, 3)
    forward, backward = lstm.directions
    forward.hits.copy_(torch.tensor([5, 5, 0, 5]))
    backward.hits.copy_(torch.tensor([0, 9, 0, 0]))
    forward.refer = backward.refer = 10
    expected = head.weight[:, [0, 1, 3, 5]].detach().clone()  # backward block starts at column 4
    assert lstm.mesimp_prune_(0.2, head) == [3, 1]
    assert lstm.output_size == head.in_features == 4
    torch.testing.assert_close(head.weight.detach(), expected)
    assert lstm(torch.randn(2, 3, 2)).shape == (2, 3, 4)

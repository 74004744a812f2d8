"""meProp LSTM: a single-layer (optionally bidirectional) LSTM with a sparsified gate gradient.

One direction, hidden size ``H``, input size ``I``, gate order ``i, f, g, o`` (as ``nn.LSTM``):

- ``z_t = x_t @ W_x.T + h_{t-1} @ W_h.T + b``          ``[B, 4H]``  (``W_x`` ``[4H, I]``, ``W_h`` ``[4H, H]``)
- ``i, f, o = sigmoid(z_i, z_f, z_o)``, ``g = tanh(z_g)``, ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``.

The forward pass is dense. In the backward pass the gate pre-activation gradient ``dz_t = dL/dz_t``
(``[B, 4H]`` per step) is sparsified per example before it reaches the two linear products:

- ``dh_{t-1} += dz_t^k @ W_h`` in the backward time loop: the only product the recurrence needs
  step by step, a weighted sum of ``k`` rows of ``W_h`` per example (:func:`kept_rows_product`);
- ``dx_t = dz_t^k @ W_x``, ``dW_x = sum_t dz_t^k.T @ x_t`` and ``dW_h = sum_t dz_t^k.T @ h_{t-1}`` after
  the loop, each one backend call over all ``T * B`` rows (the kept indices of every step are stored).

The selection (``topk_indices``) and the after-loop products (``sparse_backward``) go through the
registry's :class:`~mesimp_gpu.backends.Backend`, the same selection and sparse products as
:class:`~mesimp_gpu.meprop.MePropLinear`, so a faster backend speeds up the LSTM too. Why ``dW_h`` is
not accumulated per step: ``sparse_backward`` returns a dense ``[4H, H]`` ``dW``, and writing plus
adding one per step costs ``O(4H * H)`` per step whatever ``k`` is; one call over all steps keeps the
backward cost proportional to ``k``. That call asks for no ``dx`` (``need_dx=False``): its ``dx`` would
repeat the in-loop products ``dh_{t-1}``.
The bias gradient is dense (``sum`` of ``dz``) unless the config asks for ``sparse_bias``.

Precision and compilation, as in :mod:`mesimp_gpu.meprop`: under ``torch.autocast`` the direction runs in
autocast's dtype (its inputs and weights cast to it, the recurrence and the backward pass in it) and
the gradients take the input's and the parameters' dtypes; the forward and backward pass of a
direction are the custom operators ``torch.ops.mesimp.lstm`` and ``torch.ops.mesimp.lstm_backward``
(:data:`lstm_op`) for ``torch.compile``, and an autograd Function in eager code. ``refer`` is kept as a
tensor, so counting tokens neither waits for the device nor breaks a compiled graph.

Lazy optimizers: the backward pass marks the rows of ``W_x`` and ``W_h`` that the kept entries of all
steps touched (:mod:`mesimp_gpu.touched_rows`; every row in dense mode), as the linear layer does.

Which entries are kept (:class:`GateSelection`):

- ``per-gate`` (default): ``k`` entries in each of the four gate blocks, ``4k`` per example and step.
  ``k >= H`` is dense.
- ``all``: the ``k`` largest ``|dz|`` over all ``4H`` entries of a step. ``k >= 4H`` is dense.

Why per-gate is the default: under ``all`` the gates compete on unequal scales. ``tanh'`` is up to 1,
``sigmoid'`` at most 1/4, so the candidate gate ``g`` wins: in the EWT tagger (H=500, k=5) the top-5 over
``4H`` was 100% ``g`` at initialisation and still 71% ``g`` (16% i, 8% f, 5% o) after 3 dense epochs,
leaving the input, forget and output gates nearly without gradient. Per gate, each gate gets its own
``k``. On EWT (3 epochs, ``bench/results/pos``) per-gate k=5 (20 entries) reached 91.58 / 91.61 dev
(seeds 1 / 2) vs 91.39 / 91.58 for ``all`` k=20 (the same 20 entries) and 90.72 for ``all`` k=5; dense
91.94 / 91.98. The margin over ``all`` is small, but never negative, and no gate is starved.

Modes (:class:`~mesimp_gpu.meprop.MePropMode`): ``topk`` (per example), ``unified`` (one index set per
step for the minibatch, ranked by ``sum_b |dz|``), ``random`` (ablation), ``dense``. When ``k`` covers
the whole row the backward pass is exactly the dense LSTM gradient.

Variable lengths: a boolean mask ``[B, T]`` marks real tokens. At a padded step the state is carried
unchanged, the output is zero and ``dz`` is zero; padded rows never count as meSimp hits.

meSimp: a hidden unit counts a hit when any of its four gate entries is selected for an example and
step (:attr:`HitCounting.ANY`); :attr:`HitCounting.EACH_GATE` counts every selected gate entry instead
(up to 4 per example and step); with ``MePropConfig.nonzero_hits`` only kept entries with a non-zero
gradient count. ``refer`` counts the real (unpadded) tokens seen in training. A prune
step deletes a unit's rows in all four gates of ``W_x``, ``W_h`` and ``b``, its column of ``W_h``, its
input column of the next layer, and the matching optimizer state.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mesimp_gpu import touched_rows
from mesimp_gpu.backends import Backend, BackendCache, load_backend
from mesimp_gpu.backends.base import check_finite
from mesimp_gpu.meprop import (
    LIBRARY,
    MePropConfig,
    MePropMode,
    cast,
    compute_dtype,
    kept_bias_grad,
    own_precision,
    random_indices,
    resolved_backend,
)
from mesimp_gpu.mesimp import check_threshold, prune_mask
from mesimp_gpu.optim import slice_parameter

GATES = 4  # i, f, g, o


class GateSelection(str, enum.Enum):
    """Whether the top-k runs over all ``4H`` gate entries of a step or ``k`` per gate."""

    ALL = "all"
    PER_GATE = "per-gate"


class HitCounting(str, enum.Enum):
    """How selected gate entries turn into meSimp hits of hidden units."""

    ANY = "any"  # one hit per example and step when any of the unit's gates is selected
    EACH_GATE = "each-gate"  # one hit per selected gate entry (up to 4 per example and step)


def select_gate_entries(
    dz: Tensor, config: MePropConfig, selection: GateSelection, backend: Backend
) -> Tensor:
    """Kept entries of one step's gate gradient ``dz`` ``[B, 4H]`` -> ``idx`` ``[B, kk]`` ascending.

    ``kk`` is ``k`` (``all``) or ``4k`` (``per-gate``); the caller handles ``k`` covering the row (dense).
    """
    batch, width = dz.shape
    hidden = width // GATES
    per_gate = selection is GateSelection.PER_GATE
    k = config.k
    if config.mode is MePropMode.RANDOM:
        rows, cols = (batch * GATES, hidden) if per_gate else (batch, width)
        idx = random_indices(rows, cols, k, dz.device)
    elif config.mode is MePropMode.UNIFIED:
        check_finite(dz)
        scores = dz.abs().sum(dim=0)  # (4H,)
        idx = backend.topk_indices(scores.view(GATES, hidden) if per_gate else scores.view(1, width), k)
    else:
        idx = backend.topk_indices(dz.view(batch * GATES, hidden) if per_gate else dz, k)
    if per_gate:
        # gate blocks are ascending and disjoint, so adding the block offsets keeps each row ascending
        offsets = torch.arange(GATES, device=dz.device).mul_(hidden).view(GATES, 1)
        idx = (idx.view(-1, GATES, k) + offsets).view(-1, GATES * k)
    if config.mode is MePropMode.UNIFIED:
        idx = idx.expand(batch, idx.shape[1])
    return idx.contiguous()


def record_hits(
    hits: Tensor, idx: Tensor, valid: Tensor, counting: HitCounting, dz: Tensor | None = None
) -> None:
    """Add the hits of one step's selection ``idx`` ``[B, kk]`` for the real rows ``valid`` ``[B]`` to ``hits`` ``[H]``.

    With ``dz`` (``[B, 4H]``, ``MePropConfig.nonzero_hits``) a kept entry counts only when its gradient is non-zero.
    """
    hidden = hits.numel()
    kept = torch.ones_like(idx, dtype=torch.bool) if dz is None else dz.gather(1, idx) != 0
    units = idx % hidden  # (B, kk)
    if counting is HitCounting.EACH_GATE:
        hits += torch.bincount(units[kept & valid.unsqueeze(1)], minlength=hidden).to(hits.dtype)
    else:
        touched = torch.zeros(idx.shape[0], hidden, dtype=torch.bool, device=hits.device)
        touched.scatter_(1, units, kept)  # a unit is hit when any of its kept gate entries counts
        hits += touched[valid].sum(dim=0).to(hits.dtype)


def kept_rows_product(g: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """``G_k @ weight`` for the kept entries ``idx`` ``[B, kk]`` of ``g`` ``[B, out]``: ``[B, in]``.

    Each row gathers its ``kk`` rows of ``weight`` (``[out, in]``): ``O(B kk in)``, no ``dW``.
    """
    vals = g.gather(1, idx).unsqueeze(1)  # (B, 1, kk)
    return torch.bmm(vals, weight[idx]).squeeze(1)  # (B, 1, kk) @ (B, kk, in) -> (B, in)


def lstm_forward(
    x: Tensor,
    mask: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor,
    hits: Tensor | None,
    dtype: torch.dtype | None,
    reverse: bool,
    mode_name: str,
    k: int,
    backend: str,
    sparse_bias: bool,
    nonzero_hits: bool,
    selection: str,
    counting: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LSTM direction over a whole padded sequence, time-major, computed in ``dtype`` (None: the inputs').

    ``x`` ``[T, B, I]``, ``mask`` ``[T, B]`` bool -> the outputs ``[T, B, H]`` (zero at padded steps), then
    what the backward pass (:func:`lstm_backward`, with the same settings) reads: the activated gates
    ``[T, B, 4H]`` and, per step, the cell state before and after and the hidden state before (``[T, B, H]``
    each). ``hits`` is counted by the backward pass, not here.
    """
    x, weight_ih, weight_hh, bias = cast(dtype, x, weight_ih, weight_hh, bias)
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    # the input projection does not depend on the recurrence: one GEMM for all steps
    zx = torch.addmm(bias, x.reshape(steps * batch, -1), weight_ih.t()).view(steps, batch, GATES * hidden)
    acts = x.new_empty(steps, batch, GATES * hidden)  # activated gates i, f, g, o per step
    c_prev_all = x.new_empty(steps, batch, hidden)
    h_prev_all = x.new_empty(steps, batch, hidden)
    c_new_all = x.new_empty(steps, batch, hidden)
    out = x.new_zeros(steps, batch, hidden)
    h = x.new_zeros(batch, hidden)
    c = x.new_zeros(batch, hidden)
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        z = torch.addmm(zx[t], h, weight_hh.t())  # (B, 4H)
        a = acts[t]
        a.copy_(z)
        a[:, : 2 * hidden].sigmoid_()
        a[:, 2 * hidden : 3 * hidden].tanh_()
        a[:, 3 * hidden :].sigmoid_()
        i, f, g, o = a.chunk(GATES, dim=1)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        h_prev_all[t], c_prev_all[t], c_new_all[t] = h, c, c_new
        m = mask[t].unsqueeze(1)  # (B, 1)
        out[t] = torch.where(m, h_new, 0.0)
        h = torch.where(m, h_new, h)
        c = torch.where(m, c_new, c)
    return out, acts, c_prev_all, h_prev_all, c_new_all


def lstm_backward(
    d_out: Tensor,
    x: Tensor,
    mask: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    acts: Tensor,
    c_prev_all: Tensor,
    h_prev_all: Tensor,
    c_new_all: Tensor,
    hits: Tensor | None,
    dtype: torch.dtype | None,
    reverse: bool,
    mode_name: str,
    k: int,
    backend: str,
    sparse_bias: bool,
    nonzero_hits: bool,
    selection: str,
    counting: str,
    need_dx: bool,
    need_weight_ih: bool,
    need_weight_hh: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """meProp backward pass of :func:`lstm_forward` for ``d_out`` (``[T, B, H]``, in the compute dtype), given
    what the forward pass returned beside its output.

    Returns ``dx`` (``[T, B, I]``, ``x``'s dtype; empty unless ``need_dx``), ``dW_x``, ``dW_h`` and ``db``
    in the weights' dtype; the products run in ``dtype`` (None: the tensors' own) on ``x`` and the
    weights cast to it, and are rounded to it. Adds this pass's hits to ``hits`` (``[H]``) in place and
    marks the touched rows of the weights that need a gradient (:mod:`mesimp_gpu.touched_rows`).
    """
    config = MePropConfig(MePropMode(mode_name), k, backend, sparse_bias, nonzero_hits)
    marked = [w for w, needed in ((weight_ih, need_weight_ih), (weight_hh, need_weight_hh)) if needed]
    x_c, weight_ih_c, weight_hh_c = cast(dtype, x, weight_ih, weight_hh)
    with own_precision(d_out.device):
        dx, d_weight_ih, d_weight_hh, d_bias = lstm_products(
            d_out, x_c, mask, weight_ih_c, weight_hh_c, acts, c_prev_all, h_prev_all, c_new_all, hits, reverse,
            config, GateSelection(selection), HitCounting(counting), load_backend(backend), need_dx, marked,
        )
    return (
        dx.to(x.dtype) if dx is not None else x.new_empty(0),
        d_weight_ih.to(weight_ih.dtype),
        d_weight_hh.to(weight_hh.dtype),
        d_bias.to(weight_ih.dtype),
    )


def lstm_products(
    d_out: Tensor,
    x: Tensor,
    mask: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    acts: Tensor,
    c_prev_all: Tensor,
    h_prev_all: Tensor,
    c_new_all: Tensor,
    hits: Tensor | None,
    reverse: bool,
    config: MePropConfig,
    selection: GateSelection,
    counting: HitCounting,
    backend: Backend,
    need_dx: bool,
    marked: list[Tensor],
) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """The maths of :func:`lstm_backward` on tensors of one dtype -> ``(dx or None, dW_x, dW_h, db)`` in it;
    ``marked``: the parameters whose touched rows are recorded."""
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    per_gate = selection is GateSelection.PER_GATE
    dense = config.mode is MePropMode.DENSE or config.k >= (hidden if per_gate else GATES * hidden)

    dz_all = x.new_zeros(steps, batch, GATES * hidden)
    kept = GATES * config.k if per_gate else config.k
    idx_all = None if dense else torch.zeros(steps, batch, kept, dtype=torch.long, device=x.device)
    dh = x.new_zeros(batch, hidden)  # gradient w.r.t. the carried state h_t from later steps
    dc = x.new_zeros(batch, hidden)
    order = range(steps) if reverse else range(steps - 1, -1, -1)
    for t in order:
        m = mask[t].unsqueeze(1)  # (B, 1)
        dh_new = torch.where(m, d_out[t] + dh, 0.0)  # (B, H)
        dc_new = torch.where(m, dc, 0.0)
        i, f, g, o = acts[t].chunk(GATES, dim=1)
        tanh_c = torch.tanh(c_new_all[t])
        dc_total = dc_new + dh_new * o * (1.0 - tanh_c * tanh_c)
        dz = dz_all[t]
        dz[:, :hidden] = dc_total * g * i * (1.0 - i)
        dz[:, hidden : 2 * hidden] = dc_total * c_prev_all[t] * f * (1.0 - f)
        dz[:, 2 * hidden : 3 * hidden] = dc_total * i * (1.0 - g * g)
        dz[:, 3 * hidden :] = dh_new * tanh_c * o * (1.0 - o)
        if dense:
            dh_rec = dz @ weight_hh  # dW_h: one GEMM over all steps after the loop
            if hits is not None and config.nonzero_hits:
                every = torch.arange(GATES * hidden, device=x.device).expand(batch, -1)  # dense "selection"
                record_hits(hits, every, mask[t], counting, dz)
        else:
            idx = select_gate_entries(dz, config, selection, backend)
            idx_all[t] = idx
            if hits is not None:
                record_hits(hits, idx, mask[t], counting, dz if config.nonzero_hits else None)
            dh_rec = kept_rows_product(dz, idx, weight_hh)
        # a padded step carried h and c unchanged, so their gradients pass straight through
        dh = torch.where(m, dh_rec, dh)
        dc = torch.where(m, dc_total * f, dc)

    if hits is not None and dense and not config.nonzero_hits:  # every unit of every real row is hit
        hits += int(mask.sum()) * (GATES if counting is HitCounting.EACH_GATE else 1)
    dz_flat = dz_all.view(steps * batch, GATES * hidden)
    x_flat = x.reshape(steps * batch, -1)
    h_prev_flat = h_prev_all.view(steps * batch, hidden)
    if dense:
        idx_flat = None  # every row of both weights
        dx = dz_flat @ weight_ih if need_dx else None
        d_weight_ih = dz_flat.t() @ x_flat
        d_weight_hh = dz_flat.t() @ h_prev_flat
        d_bias = dz_flat.sum(dim=0)
    else:
        idx_flat = idx_all.view(steps * batch, kept)
        dx, d_weight_ih = backend.sparse_backward(dz_flat, idx_flat, x_flat, weight_ih, need_dx)
        _, d_weight_hh = backend.sparse_backward(dz_flat, idx_flat, h_prev_flat, weight_hh, need_dx=False)
        d_bias = kept_bias_grad(dz_flat, idx_flat) if config.sparse_bias else dz_flat.sum(dim=0)
    for weight in marked:
        touched_rows.mark(weight, idx_flat)
    return (dx.view_as(x) if dx is not None else None), d_weight_ih, d_weight_hh, d_bias


def _lstm_setup_context(ctx, inputs: tuple, output: tuple[Tensor, ...]) -> None:
    """Keep what the backward pass needs from :func:`lstm_forward`'s ``inputs`` and ``output`` (its five tensors)."""
    x, mask, weight_ih, weight_hh, _, hits, *settings = inputs
    ctx.save_for_backward(x, mask, weight_ih, weight_hh, *output[1:])
    ctx.mark_non_differentiable(*output[1:])  # the saved activations, returned only to be saved
    # hits is not saved: a saved tensor's version is checked, and every backward pass mutates hits
    ctx.hits, ctx.settings = hits, settings


def _lstm_grads(ctx, d_out: Tensor, backward: Callable[..., tuple[Tensor, ...]]) -> tuple[Tensor | None, ...]:
    """The input gradients of :func:`lstm_forward` from ``backward`` (:func:`lstm_backward` or its operator)."""
    x, mask, weight_ih, weight_hh, *saved = ctx.saved_tensors
    need_dx, _, need_ih, need_hh, need_bias = ctx.needs_input_grad[:5]
    dx, d_weight_ih, d_weight_hh, d_bias = backward(
        d_out, x, mask, weight_ih, weight_hh, *saved, ctx.hits, *ctx.settings, need_dx, need_ih, need_hh
    )
    return (dx if need_dx else None, None, d_weight_ih if need_ih else None, d_weight_hh if need_hh else None,
            d_bias if need_bias else None, *[None] * 10)


class MePropLSTMFunction(torch.autograd.Function):
    """:func:`lstm_forward` and :func:`lstm_backward` for eager execution; ``torch.compile`` traces the same
    two functions as the operators of :data:`lstm_op` (see :class:`~mesimp_gpu.meprop.MePropFunction`)."""

    @staticmethod
    def forward(ctx, *inputs):  # type: ignore[override]
        outputs = lstm_forward(*inputs)
        _lstm_setup_context(ctx, inputs, outputs)
        return outputs

    @staticmethod
    def backward(ctx, d_out: Tensor, *_: Tensor):  # type: ignore[override]
        return _lstm_grads(ctx, d_out, lstm_backward)


#: ``torch.ops.mesimp.lstm``: :func:`lstm_forward` as a custom operator, its backward pass the operator
#: ``torch.ops.mesimp.lstm_backward`` (which mutates ``hits``)
lstm_op = torch.library.custom_op(f"{LIBRARY}::lstm", lstm_forward, mutates_args=())
lstm_backward_op = torch.library.custom_op(f"{LIBRARY}::lstm_backward", lstm_backward, mutates_args=("hits",))


@lstm_op.register_fake
def _(x, mask, weight_ih, weight_hh, bias, hits, dtype, *settings):
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    states = [x.new_empty(steps, batch, n, dtype=dtype or x.dtype) for n in (hidden, GATES * hidden, hidden, hidden, hidden)]
    return tuple(states)


@lstm_backward_op.register_fake
def _(d_out, x, mask, weight_ih, weight_hh, acts, c_prev_all, h_prev_all, c_new_all, hits, dtype, reverse, mode_name,
      k, backend, sparse_bias, nonzero_hits, selection, counting, need_dx, need_weight_ih, need_weight_hh):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, weight_ih.new_empty(weight_ih.shape), weight_hh.new_empty(weight_hh.shape), \
        weight_ih.new_empty(weight_ih.shape[0])


lstm_op.register_autograd(lambda ctx, d_out, *_: _lstm_grads(ctx, d_out, lstm_backward_op),
                          setup_context=_lstm_setup_context)


def meprop_lstm(*inputs) -> Tensor:
    """The output ``[T, B, H]`` of :func:`lstm_forward` with its meProp backward pass: the operator while
    ``torch.compile`` traces, :class:`MePropLSTMFunction` otherwise."""
    if torch.compiler.is_compiling():
        return lstm_op(*inputs)[0]
    return MePropLSTMFunction.apply(*inputs)[0]


class MePropLSTMDirection(nn.Module):
    """The parameters and meSimp record of one LSTM direction.

    ``weight_ih`` ``[4H, I]``, ``weight_hh`` ``[4H, H]``, ``bias`` ``[4H]`` (gate order i, f, g, o),
    ``hits`` ``[H]`` int64 (with ``track_hits``), ``refer`` (real tokens seen in training).
    """

    def __init__(self, input_size: int, hidden_size: int, reverse: bool, track_hits: bool) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.reverse = input_size, hidden_size, reverse
        self.weight_ih = nn.Parameter(torch.empty(GATES * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(GATES * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(GATES * hidden_size))
        self.register_buffer("hits", torch.zeros(hidden_size, dtype=torch.long) if track_hits else None)
        # ``refer`` as a tensor on the layer's device (not part of the state dict, like the int it replaces)
        self.register_buffer("refer_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.reset_parameters()

    @property
    def refer(self) -> int:
        """Real tokens seen in training since the last reset of the meSimp record."""
        return int(self.refer_count)

    @refer.setter
    def refer(self, value: int) -> None:
        self.refer_count.fill_(value)

    def reset_parameters(self) -> None:
        """``U(-1/sqrt(H), 1/sqrt(H))`` as ``nn.LSTM``; the forget-gate bias starts at 1 to keep memory early on."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.weight_ih.uniform_(-bound, bound)
            self.weight_hh.uniform_(-bound, bound)
            self.bias.zero_()
            self.bias[self.hidden_size : 2 * self.hidden_size] = 1.0

    def prune_units_(self, keep: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        """Delete the units where ``keep`` (``[H]`` bool) is False from all four gates, ``W_h``'s columns, the state."""
        gate_rows = keep.repeat(GATES)  # (4H,): the unit's row in each gate block
        slice_parameter(self, "weight_ih", lambda w: w[gate_rows], optimizer)
        slice_parameter(self, "weight_hh", lambda w: w[gate_rows][:, keep], optimizer)
        slice_parameter(self, "bias", lambda b: b[gate_rows], optimizer)
        if self.hits is not None:
            self.hits = self.hits[keep].clone()
        self.hidden_size = int(keep.sum())

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, reverse={self.reverse}"


class MePropLSTM(nn.Module):
    """Single-layer LSTM with a meProp backward pass; input ``[B, T, I]`` -> output ``[B, T, H_total]``.

    ``H_total`` is ``H`` or, bidirectional, ``H_forward + H_backward`` (forward block first); after
    meSimp pruning the two directions may differ in size. ``lengths`` ``[B]`` or ``mask`` ``[B, T]``
    mark real tokens (right padding with lengths; any pattern with a mask).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        config: MePropConfig | None = None,
        bidirectional: bool = False,
        selection: GateSelection = GateSelection.PER_GATE,
        counting: HitCounting = HitCounting.ANY,
        track_hits: bool = False,
    ) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"LSTM sizes must be positive, got input {input_size}, hidden {hidden_size}")
        self.input_size = input_size
        self.config = config or MePropConfig()
        self.selection, self.counting = GateSelection(selection), HitCounting(counting)
        self.directions = nn.ModuleList(
            MePropLSTMDirection(input_size, hidden_size, reverse, track_hits)
            for reverse in ((False, True) if bidirectional else (False,))
        )
        self._backends = BackendCache()  # config.backend per input device, resolved once

    @property
    def output_size(self) -> int:
        """Width of the output: the sum of the directions' hidden sizes."""
        return sum(d.hidden_size for d in self.directions)

    def forward(self, x: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"expected input [batch, time, {self.input_size}], got {tuple(x.shape)}")
        batch, steps, _ = x.shape
        if mask is None:
            if lengths is None:
                mask = torch.ones(batch, steps, dtype=torch.bool, device=x.device)
            else:
                # the values are checked in eager code only: reading them is data-dependent, which torch.compile
                # cannot trace (a length over T marks every step real, as T would)
                if lengths.shape != (batch,) or (
                    not torch.compiler.is_compiling() and batch > 0 and int(lengths.max()) > steps
                ):
                    raise ValueError(f"lengths must be [batch] with values <= {steps}, got {lengths.tolist()}")
                mask = torch.arange(steps, device=x.device) < lengths.to(x.device).unsqueeze(1)
        elif mask.shape != (batch, steps):
            raise ValueError(f"mask must be [batch, time] = {(batch, steps)}, got {tuple(mask.shape)}")
        x_tm = x.transpose(0, 1).contiguous()  # (T, B, I)
        mask_tm = mask.to(torch.bool).t().contiguous()  # (T, B)
        c = self.config
        backend = resolved_backend(self._backends, c.backend, x.device)
        dtype = compute_dtype(x.device, self.directions[0].weight_ih)
        recording = self.training and torch.is_grad_enabled()
        outputs = []
        for d in self.directions:
            hits = d.hits if recording else None
            if hits is not None:
                d.refer_count += mask_tm.sum()  # a tensor: no device sync, nothing for torch.compile to break on
            outputs.append(
                meprop_lstm(
                    x_tm, mask_tm, d.weight_ih, d.weight_hh, d.bias, hits, dtype, d.reverse, c.mode.value, c.k,
                    backend, c.sparse_bias, c.nonzero_hits, self.selection.value, self.counting.value,
                )
            )
        return torch.cat(outputs, dim=2).transpose(0, 1)  # (B, T, H_total)

    def prune_units_(
        self, keeps: list[Tensor], next_layer: nn.Linear, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Delete hidden units for good: ``keeps[d]`` (``[H_d]`` bool) per direction.

        ``next_layer`` reads this LSTM's output (``in_features == output_size``); its matching input
        columns are removed too. Optimizer state of every sliced parameter is sliced alike.
        """
        if len(keeps) != len(self.directions):
            raise ValueError(f"need one keep mask per direction ({len(self.directions)}), got {len(keeps)}")
        if next_layer.in_features != self.output_size:
            raise ValueError(
                f"next layer reads {next_layer.in_features} inputs but the LSTM outputs {self.output_size}"
            )
        for keep, d in zip(keeps, self.directions):
            if keep.shape != (d.hidden_size,) or keep.dtype != torch.bool:
                raise ValueError(f"keep mask must be bool [{d.hidden_size}], got {keep.dtype} {tuple(keep.shape)}")
            if not bool(keep.any()):
                raise ValueError("a prune step would remove every unit of a direction; lower the threshold")
        columns = torch.cat([k.to(next_layer.weight.device) for k in keeps])  # (H_total,)
        for keep, d in zip(keeps, self.directions):
            d.prune_units_(keep, optimizer)
        slice_parameter(next_layer, "weight", lambda w: w[:, columns], optimizer)
        next_layer.in_features = int(columns.sum())

    def mesimp_prune_(
        self, threshold: float, next_layer: nn.Linear, optimizer: torch.optim.Optimizer | None = None
    ) -> list[int]:
        """meSimp step: drop units with ``hits < floor(refer * threshold)``, reset the record, return kept sizes.

        The rule is the MLP's (:func:`~mesimp_gpu.mesimp.prune_mask`): the most-hit unit of a direction
        always stays, and a direction that saw no tokens since the last step keeps all its units.
        """
        check_threshold(threshold)
        if any(d.hits is None for d in self.directions):
            raise ValueError("meSimp needs hit records: build the LSTM with track_hits=True")
        keeps = [prune_mask(d.hits, d.refer, threshold) for d in self.directions]
        self.prune_units_(keeps, next_layer, optimizer)
        for d in self.directions:
            d.hits.zero_()
            d.refer = 0
        return [d.hidden_size for d in self.directions]

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{self.input_size}, {[d.hidden_size for d in self.directions]}, mode={c.mode.value}, k={c.k}, "
            f"selection={self.selection.value}, backend={c.backend}"
        )

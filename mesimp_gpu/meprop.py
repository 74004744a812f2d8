"""meProp: a linear layer whose backward pass keeps only the top-k output-gradient entries.

The forward pass is the ordinary dense ``y = x @ W.T + b``. In the backward pass, with
``G = dL/dy`` of shape ``[B, out]``:

- ``topk`` (per example, the paper's method): each row keeps its ``k`` largest ``|G[b, j]|``
  (ties to the lower index); ``dx = G_k @ W`` and ``dW = G_k.T @ x``.
- ``unified`` (shared over the minibatch): one column set from ``sum_b |G[b, :]|``;
  ``dx = G[:, S] @ W[S]``, ``dW[S] = G[:, S].T @ x``, other rows of ``dW`` zero.
- ``random`` (ablation): ``k`` columns drawn uniformly per example instead of the top-k.
- ``dense``: ordinary back propagation.

The bias gradient is ``sum_b G[b, :]`` (dense, as in the reference) unless ``sparse_bias`` is set,
in which case only the kept entries contribute. ``k >= out`` is exactly dense back propagation.
The products themselves are computed by a :class:`~mesimp_gpu.backends.Backend` chosen by name.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mesimp_gpu import touched_rows
from mesimp_gpu.backends import Backend, BackendCache
from mesimp_gpu.backends.base import bincount_hits, masked_gradient
from mesimp_gpu.mesimp import reference_hits
from mesimp_gpu.optim import slice_parameter


class MePropMode(str, enum.Enum):
    """How the backward pass sparsifies the output gradient."""

    DENSE = "dense"
    TOPK = "topk"
    UNIFIED = "unified"
    RANDOM = "random"


@dataclass(frozen=True)
class MePropConfig:
    """Backward-pass settings of one :class:`MePropLinear`."""

    mode: MePropMode = MePropMode.TOPK  # which sparsification the backward pass uses
    k: int = 20  # entries (per example) or columns (unified) kept; k >= out is dense
    backend: str = "auto"  # registry name, see mesimp_gpu.backends
    sparse_bias: bool = False  # True: the bias gradient also uses only the kept entries
    nonzero_hits: bool = False  # meSimp: count only kept entries with a non-zero gradient (reference: all kept)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")


def random_indices(batch: int, width: int, k: int, device: torch.device) -> Tensor:
    """``k`` distinct columns per row drawn uniformly (torch's RNG) -> ``[batch, k]`` ascending."""
    return torch.rand(batch, width, device=device).argsort(dim=1)[:, :k].sort(dim=1).values


def count_nonzero_hits(hits: Tensor, g: Tensor, idx: Tensor) -> None:
    """Add one to ``hits[j]`` for every kept ``(b, j)`` (``idx`` ``[B, k]``) whose ``g[b, j]`` is non-zero."""
    bincount_hits(hits, idx[g.gather(1, idx) != 0])


def kept_bias_grad(g: Tensor, idx: Tensor) -> Tensor:
    """``sum_b G_k[b, :]`` for per-example kept indices ``idx`` ``[B, k]`` -> ``[out]``."""
    return masked_gradient(g, idx).sum(dim=0)


class MePropFunction(torch.autograd.Function):
    """Autograd function for a 2-D meProp linear map; see the module docstring for the maths."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        config: MePropConfig,
        backend: Backend,
        hits: Tensor | None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.config, ctx.backend, ctx.hits, ctx.has_bias = config, backend, hits, bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        config: MePropConfig = ctx.config
        g = g.contiguous()
        batch, width = g.shape
        need_dx = ctx.needs_input_grad[0]  # False for a first layer fed with data
        db = g.sum(dim=0) if ctx.has_bias else None
        # every kept index counts as a hit (the reference); with nonzero_hits the backends count
        # nothing and the kept non-zero entries are counted below instead
        all_hits = None if config.nonzero_hits else ctx.hits
        idx: Tensor | None = None  # kept columns per example; None: every column
        if config.mode is MePropMode.DENSE or config.k >= width:
            if all_hits is not None:
                all_hits += batch  # every column is in every example's set
            dx, dw = g.mm(weight) if need_dx else None, g.t().mm(x)
        elif config.mode is MePropMode.UNIFIED:
            dx, dw, cols = ctx.backend.unified_backward(g, x, weight, config.k, need_dx)
            if all_hits is not None:
                all_hits[cols] += batch
            idx = cols.expand(batch, cols.numel())
            if db is not None and config.sparse_bias:
                db = torch.zeros_like(db).index_copy_(0, cols, db[cols])
        else:
            if config.mode is MePropMode.TOPK:
                dx, dw, idx = ctx.backend.topk_backward(g, x, weight, config.k, all_hits, need_dx)
            else:
                idx = random_indices(batch, width, config.k, g.device)
                if all_hits is not None:
                    bincount_hits(all_hits, idx)
                dx, dw = ctx.backend.sparse_backward(g, idx, x, weight, need_dx)
            if db is not None and config.sparse_bias:
                db = kept_bias_grad(g, idx)
        if ctx.hits is not None and config.nonzero_hits:
            every = torch.arange(width, device=g.device).expand(batch, width)
            count_nonzero_hits(ctx.hits, g, every if idx is None else idx)
        if ctx.needs_input_grad[1]:  # rows of dW that can be non-zero, for a lazy optimizer that armed a record
            touched_rows.mark(weight, idx)
        return dx if need_dx else None, dw, db, None, None, None


class MePropLinear(nn.Module):
    """Drop-in ``nn.Linear`` with a meProp backward pass.

    Input ``[..., in_features]``, output ``[..., out_features]``; leading dimensions are flattened
    into the batch for the backward selection (each flattened row is one "example").
    With ``track_hits`` the layer keeps ``hits`` (``[out]`` int64, how often each output neuron was
    selected) and ``refer`` (examples seen) for meSimp; both count only during training. Every kept
    index is a hit, zeros included (the reference); ``config.nonzero_hits`` counts only kept entries
    with a non-zero gradient. With ``reference_hits`` (needs ``track_hits``) the layer also keeps
    ``columns`` (``[out]`` int64, each live neuron's original position) and counts hits by the C#'s rule
    instead (:func:`~mesimp_gpu.mesimp.reference_hits`, from the same output gradient; the backward
    products are unchanged). The backend ``config.backend`` names is resolved once per input device
    and kept (assigning a new ``config`` with another backend resolves again).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: MePropConfig | None = None,
        bias: bool = True,
        track_hits: bool = False,
        reference_hits: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"layer sizes must be positive, got {in_features} -> {out_features}")
        if reference_hits and not track_hits:
            raise ValueError("reference_hits counts hits: it needs track_hits=True")
        self.in_features, self.out_features = in_features, out_features
        self.config = config or MePropConfig()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("hits", torch.zeros(out_features, dtype=torch.long) if track_hits else None)
        self.register_buffer("columns", torch.arange(out_features) if reference_hits else None)
        self.refer = 0
        self._backends = BackendCache()  # config.backend per input device, resolved once
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's initialisation: ``W ~ N(0, sqrt(6 / (fan_in + fan_out)))``, ``b = 0``."""
        std = math.sqrt(6.0 / (self.in_features + self.out_features))
        with torch.no_grad():
            self.weight.normal_(0.0, std)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        if self.config.mode is MePropMode.DENSE and self.hits is None:
            return nn.functional.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        recording = self.hits is not None and self.training and torch.is_grad_enabled()
        if recording:
            self.refer += x2.shape[0]
        backend = self._backends.resolve(self.config.backend, x.device)
        by_reference = recording and self.columns is not None
        counted = self.hits if recording and not by_reference else None
        y = MePropFunction.apply(x2, self.weight, self.bias, self.config, backend, counted)
        if by_reference:  # the hook sees the same output gradient G as the backward pass
            y.register_hook(self._count_reference_hits)
        return y.reshape(*lead, self.out_features)

    def _count_reference_hits(self, g: Tensor) -> None:
        self.hits += reference_hits(g, self.columns, self.config.k)

    def prune_outputs_(
        self, keep: Tensor, next_layer: MePropLinear, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Delete the output neurons where ``keep`` (``[out]`` bool) is False, in place (meSimp).

        Slices ``weight`` ``[out, in]`` and ``bias`` ``[out]`` by rows, the hit record, and
        ``next_layer.weight`` ``[next_out, out]`` by columns, each with its optimizer state.
        """
        if keep.shape != (self.out_features,) or keep.dtype != torch.bool:
            raise ValueError(f"keep mask must be bool [{self.out_features}], got {keep.dtype} {tuple(keep.shape)}")
        if next_layer.in_features != self.out_features:
            raise ValueError(f"next layer reads {next_layer.in_features} inputs, the layer has {self.out_features} outputs")
        keep = keep.to(self.weight.device)
        slice_parameter(self, "weight", lambda w: w[keep], optimizer)
        if self.bias is not None:
            slice_parameter(self, "bias", lambda b: b[keep], optimizer)
        if self.hits is not None:
            self.hits = self.hits[keep].clone()
        if self.columns is not None:
            self.columns = self.columns[keep].clone()
        slice_parameter(next_layer, "weight", lambda w: w[:, keep], optimizer)
        self.out_features = next_layer.in_features = int(keep.sum())

    def reset_record_(self) -> None:
        """Zero the meSimp hit record (``hits`` and ``refer``)."""
        if self.hits is not None:
            self.hits.zero_()
        self.refer = 0

    def extra_repr(self) -> str:
        c = self.config
        return f"{self.in_features}, {self.out_features}, mode={c.mode.value}, k={c.k}, backend={c.backend}"

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

Precision. Under ``torch.autocast`` the layer computes as ``nn.Linear`` does there: ``x``, ``W`` and
``b`` are cast to autocast's dtype (bfloat16 on the CPU, float16 or bfloat16 on CUDA), the output has
that dtype, and the backward pass selects on the gradient in that dtype and multiplies ``x`` and ``W``
cast to it; ``dx`` then takes the input's dtype and ``dW``, ``db`` the parameters' (what autograd's casts
give a dense layer). Parameters stored in float16 or bfloat16 compute in their own dtype. Every backend
takes float32, float16 and bfloat16 (the kernels accumulate half-precision products in float32).

Compilation. The forward and backward pass are also the custom operators ``torch.ops.mesimp.linear``
and ``torch.ops.mesimp.linear_backward`` (:data:`linear_op`, with fake implementations and autograd),
which ``torch.compile`` traces as single nodes, without a graph break; the backward operator declares
that it mutates ``hits``. The backend is passed to them by name, resolved outside the graph
(:func:`resolved_backend`). Eager code runs the same two functions through :class:`MePropFunction`.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mesimp_gpu import touched_rows
from mesimp_gpu.backends import Backend, BackendCache, load_backend
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


#: the ``torch.library`` namespace of the meProp operators (``torch.ops.mesimp.*``)
LIBRARY = "mesimp"


@torch.compiler.assume_constant_result
def resolved_backend(cache: BackendCache, name: str, device: torch.device) -> str:
    """The registry name that backend ``name`` (``auto`` included) stands for on ``device``, through the
    layer's ``cache``: looked up once per device. ``torch.compile`` calls it while tracing and keeps the
    name as a constant, so the import a first look-up may do stays outside the graph."""
    return cache.resolve(name, device).name


def compute_dtype(device: torch.device, weight: Tensor) -> torch.dtype | None:
    """The dtype a meProp layer on ``device`` computes in: autocast's, when autocast is on for the device's
    type (and the weights are not float64, which autocast leaves alone); None: the tensors' own dtype."""
    if torch.is_autocast_enabled(device.type) and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(device.type)
    return None


def cast(dtype: torch.dtype | None, *tensors: Tensor | None) -> list[Tensor | None]:
    """``tensors`` in ``dtype``; None entries, and every tensor when ``dtype`` is None, stay as they are."""
    return [t if t is None or dtype is None else t.to(dtype) for t in tensors]


def own_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for ``device``'s type while an operator runs in the dtype it chose (a backward pass called
    inside an autocast region must not re-cast the backends' products); nothing to do when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    hits: Tensor | None,
    dtype: torch.dtype | None,
    mode_name: str,
    k: int,
    backend: str,
    sparse_bias: bool,
    nonzero_hits: bool,
) -> Tensor:
    """``y = x @ W.T + b`` (``x`` ``[B, in]``, ``weight`` ``[out, in]``, ``bias`` ``[out]`` -> ``[B, out]``)
    computed in ``dtype`` (None: the inputs' own). The backward pass is :func:`linear_backward` with the
    same settings (``mode_name``: a :class:`MePropMode` value, ``k``, ``sparse_bias``, ``nonzero_hits`` as in :class:`MePropConfig`,
    ``backend`` a resolved registry name); ``hits`` (``[out]`` int64) is counted there, not here."""
    x, weight, bias = cast(dtype, x, weight, bias)
    return nn.functional.linear(x, weight, bias)


def linear_backward(
    g: Tensor,
    x: Tensor,
    weight: Tensor,
    hits: Tensor | None,
    dtype: torch.dtype | None,
    mode_name: str,
    k: int,
    backend: str,
    sparse_bias: bool,
    nonzero_hits: bool,
    has_bias: bool,
    need_dx: bool,
    need_dw: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """meProp backward pass of :func:`linear_forward` for ``g = dL/dy`` (``[B, out]``, in the compute dtype).

    Returns ``dx`` (``[B, in]``, ``x``'s dtype; empty unless ``need_dx``: a first layer fed with data),
    ``dW`` (``[out, in]``) and ``db`` (``[out]``; empty without a bias), both in ``weight``'s dtype. The
    products run in ``dtype`` (None: the tensors' own) on ``x`` and ``weight`` cast to it, as a dense layer
    under autocast computes them, and are rounded to it before they take the inputs' dtypes. Adds the
    kept indices to ``hits`` in place (every kept index; only the non-zero ones with ``nonzero_hits``);
    with ``need_dw`` marks the rows of ``weight`` that ``dW`` can be non-zero in (:mod:`.touched_rows`).
    """
    with own_precision(g.device):
        dx, dw, db = linear_products(
            g.contiguous(), *cast(dtype, x, weight), hits, MePropMode(mode_name), k, load_backend(backend),
            sparse_bias, nonzero_hits, has_bias, need_dx, weight if need_dw else None,
        )
    empty = g.new_empty(0)
    return (
        dx.to(x.dtype) if dx is not None else empty.to(x.dtype),
        dw.to(weight.dtype),
        db.to(weight.dtype) if db is not None else empty.to(weight.dtype),
    )


def linear_products(
    g: Tensor,
    x: Tensor,
    weight: Tensor,
    hits: Tensor | None,
    mode: MePropMode,
    k: int,
    backend: Backend,
    sparse_bias: bool,
    nonzero_hits: bool,
    has_bias: bool,
    need_dx: bool,
    marked: Tensor | None,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """The maths of :func:`linear_backward` on ``g`` ``[B, out]``, ``x`` ``[B, in]`` and ``weight``
    ``[out, in]`` of one dtype -> ``(dx or None, dW, db or None)`` in it; ``marked``: the parameter whose
    touched rows are recorded (None: no record)."""
    batch, width = g.shape
    db = g.sum(dim=0) if has_bias else None
    # every kept index counts as a hit (the reference); with nonzero_hits the backends count
    # nothing and the kept non-zero entries are counted below instead
    all_hits = None if nonzero_hits else hits
    idx: Tensor | None = None  # kept columns per example; None: every column
    if mode is MePropMode.DENSE or k >= width:
        if all_hits is not None:
            all_hits += batch  # every column is in every example's set
        dx, dw = g.mm(weight) if need_dx else None, g.t().mm(x)
    elif mode is MePropMode.UNIFIED:
        dx, dw, cols = backend.unified_backward(g, x, weight, k, need_dx)
        if all_hits is not None:
            all_hits[cols] += batch
        idx = cols.expand(batch, cols.numel())
        if db is not None and sparse_bias:
            db = torch.zeros_like(db).index_copy_(0, cols, db[cols])
    else:
        if mode is MePropMode.TOPK:
            dx, dw, idx = backend.topk_backward(g, x, weight, k, all_hits, need_dx)
        else:
            idx = random_indices(batch, width, k, g.device)
            if all_hits is not None:
                bincount_hits(all_hits, idx)
            dx, dw = backend.sparse_backward(g, idx, x, weight, need_dx)
        if db is not None and sparse_bias:
            db = kept_bias_grad(g, idx)
    if hits is not None and nonzero_hits:
        every = torch.arange(width, device=g.device).expand(batch, width)
        count_nonzero_hits(hits, g, every if idx is None else idx)
    if marked is not None:  # rows of dW that can be non-zero, for a lazy optimizer that armed a record
        touched_rows.mark(marked, idx)
    return dx, dw, db


def _linear_setup_context(ctx, inputs: tuple, output: Tensor | None) -> None:
    """Keep what the backward pass needs from :func:`linear_forward`'s ``inputs``."""
    x, weight, bias, hits, *settings = inputs
    ctx.save_for_backward(x, weight)
    # hits is not saved: a saved tensor's version is checked, and every backward pass mutates hits
    ctx.hits, ctx.settings, ctx.has_bias = hits, settings, bias is not None


def _linear_grads(ctx, g: Tensor, backward: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor | None, ...]:
    """The input gradients of :func:`linear_forward` from ``backward`` (:func:`linear_backward` or its operator)."""
    x, weight = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = backward(g, x, weight, ctx.hits, *ctx.settings, ctx.has_bias, need_dx, need_dw)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, *[None] * 7)


class MePropFunction(torch.autograd.Function):
    """:func:`linear_forward` and :func:`linear_backward` for eager execution.

    The same two functions are the operators ``mesimp::linear`` and ``mesimp::linear_backward``
    (:data:`linear_op`), which ``torch.compile`` traces; eager code calls them through this Function
    instead, because torch's Python glue around a custom operator costs tens of microseconds per call
    (it rebuilds the argument list from the schema, quadratic in the argument count), a tenth of a
    small layer's step.
    """

    @staticmethod
    def forward(ctx, *inputs):  # type: ignore[override]
        _linear_setup_context(ctx, inputs, None)
        return linear_forward(*inputs)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return _linear_grads(ctx, g, linear_backward)


#: ``torch.ops.mesimp.linear``: :func:`linear_forward` as a custom operator, its backward pass the
#: operator ``torch.ops.mesimp.linear_backward`` (which mutates ``hits``)
linear_op = torch.library.custom_op(f"{LIBRARY}::linear", linear_forward, mutates_args=())
linear_backward_op = torch.library.custom_op(f"{LIBRARY}::linear_backward", linear_backward, mutates_args=("hits",))


@linear_op.register_fake
def _(x, weight, bias, hits, dtype, mode_name, k, backend, sparse_bias, nonzero_hits):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=dtype or x.dtype)


@linear_backward_op.register_fake
def _(g, x, weight, hits, dtype, mode_name, k, backend, sparse_bias, nonzero_hits, has_bias, need_dx, need_dw):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, weight.new_empty(weight.shape), weight.new_empty(weight.shape[0] if has_bias else 0)


linear_op.register_autograd(
    lambda ctx, g: _linear_grads(ctx, g, linear_backward_op), setup_context=_linear_setup_context
)


def meprop_linear(*inputs) -> Tensor:
    """:func:`linear_forward` with its meProp backward pass: the operator while ``torch.compile`` traces,
    :class:`MePropFunction` otherwise (see there why)."""
    if torch.compiler.is_compiling():
        return linear_op(*inputs)
    return MePropFunction.apply(*inputs)


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
        c = self.config
        by_reference = recording and self.columns is not None
        counted = self.hits if recording and not by_reference else None
        y = meprop_linear(
            x2, self.weight, self.bias, counted, compute_dtype(x.device, self.weight), c.mode.value, c.k,
            resolved_backend(self._backends, c.backend, x.device), c.sparse_bias, c.nonzero_hits,
        )
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

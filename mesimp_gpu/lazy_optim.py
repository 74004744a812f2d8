"""Lazy optimizers: update only the rows of a weight that per-example meProp touched.

With per-example meProp the weight gradient ``dW`` (``[out, in]``) is zero outside the rows of the
kept columns, so an update of the other rows is either a no-op (plain SGD) or only the decay of an
optimizer state. A lazy optimizer arms a record on each of its parameters
(:func:`track_touched_rows`); :class:`MePropFunction` adds the kept columns to an armed record
(:func:`mark_touched_rows`) during backward, and does nothing for parameters of other optimizers.
:class:`LazySGD`, :class:`LazyAdam` and :class:`LazyAdagrad` read the record at :meth:`step`,
update those rows only, and re-arm it. Parameters without rows in their record (biases, layers
that are not meProp, dense mode, a parameter that meSimp replaced since the last step) get the
ordinary dense update. On CPU the updates are the cpu backend's fused row kernels.

Semantics:

- ``LazySGD`` without momentum is exactly SGD. With momentum, the buffers of untouched rows are not
  decayed and those rows do not move (dense SGD would keep moving them with the decayed momentum).
- ``LazyAdagrad`` is exactly AdaGrad: a zero gradient changes neither its accumulator nor the row.
- ``LazyAdam`` decays ``exp_avg`` and ``exp_avg_sq`` only on touched rows and moves only those rows;
  the step counter (bias correction) is per parameter, as in dense Adam. This differs slightly from
  Adam, which also decays the moments of, and keeps moving, rows whose gradient is zero (the same
  trade as ``torch.optim.SparseAdam``).
- ``clip_value`` clamps every gradient entry to ``[-clip_value, clip_value]`` before the update (the
  reference's element-wise clipping); on the touched rows only, which is exact because the other
  rows are zero.
- The record assumes the weight's gradient comes only from meProp backward passes. A weight that
  also receives gradient through another path (weight tying, a penalty on ``W`` in the loss) must
  use a dense optimizer. Records of several backward passes before one step are united.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType

import torch
from torch import Tensor

#: attribute on a weight Parameter: kept-column tensors since the last lazy step, or [None] (every row)
TOUCHED_ROWS_ATTR = "meprop_touched_rows"
#: records kept before they are folded into one index tensor (bounds memory under dense optimizers)
MAX_PENDING = 16


def union_rows(pending: list[Tensor], n_rows: int) -> Tensor:
    """Sorted unique rows (``[r]`` int64) of a list of index tensors of any shape."""
    mask = torch.zeros(n_rows, dtype=torch.bool, device=pending[0].device)
    for rows in pending:
        mask.index_fill_(0, rows.reshape(-1), True)
    return mask.nonzero().squeeze(1)


def track_touched_rows(param: Tensor) -> None:
    """Arm (or clear) the touched-rows record of ``param``, so that backward passes fill it."""
    param.__dict__[TOUCHED_ROWS_ATTR] = []


def mark_touched_rows(weight: Tensor, rows: Tensor | None) -> None:
    """Record that a backward pass wrote ``weight.grad`` only in ``rows`` (int64, any shape; None: every row).

    Only an armed record (:func:`track_touched_rows`) is filled, so weights of dense optimizers cost
    nothing. Usually keeps a reference only (no copy, no kernel); every ``MAX_PENDING`` records are
    folded into one (many backward passes before one step hold a bounded amount).
    """
    pending = weight.__dict__.get(TOUCHED_ROWS_ATTR)
    if pending is None or (pending and pending[0] is None):
        return  # not armed, or already every row
    if rows is None:
        pending[:] = [None]
        return
    pending.append(rows)
    if len(pending) > MAX_PENDING:
        pending[:] = [union_rows(pending, weight.shape[0])]


def take_touched_rows(param: Tensor, union: Callable[[list[Tensor], int], Tensor] = union_rows) -> Tensor | None:
    """Sorted unique rows recorded on ``param`` since the last call; re-arms an empty record.

    Returns None when the update must be dense: no record, a record of every row, or every row touched.
    ``union`` merges the records (:func:`union_rows`, or the compiled one of the cpu backend).
    """
    pending = param.__dict__.get(TOUCHED_ROWS_ATTR)
    track_touched_rows(param)
    if not pending or pending[0] is None:
        return None
    touched = union(pending, param.shape[0])
    return None if touched.numel() == param.shape[0] else touched


def clipped(grad: Tensor, clip_value: float | None) -> Tensor:
    """``grad`` clamped element-wise to ``[-clip_value, clip_value]`` in place (None: unchanged)."""
    return grad if clip_value is None else grad.clamp_(-clip_value, clip_value)


def compiled_kernels(fused: bool | None) -> ModuleType | None:
    """The cpu backend's compiled update kernels, or None for the torch-ops path.

    ``fused``: None uses them where they build (else falls back silently), True requires them,
    False never uses them.
    """
    if fused is False:
        return None
    from mesimp_gpu.backends import BackendUnavailable, load_backend

    try:
        return load_backend("cpu").ops
    except BackendUnavailable:
        if fused:
            raise
        return None


class LazyOptimizer(torch.optim.Optimizer):
    """Shared :meth:`step`: finds each parameter's touched rows and calls :meth:`update`.

    On CPU float32/float64 parameters the update of the touched rows is one fused, multi-threaded
    in-place pass (the cpu backend's C++ kernel); elsewhere it gathers the rows with torch ops.
    """

    def __init__(self, params: Iterable[Tensor], defaults: dict, fused: bool | None) -> None:
        clip_value = defaults.get("clip_value")
        if clip_value is not None and clip_value <= 0:
            raise ValueError(f"clip_value must be positive, got {clip_value}")
        if defaults["lr"] <= 0:
            raise ValueError(f"learning rate must be positive, got {defaults['lr']}")
        super().__init__(params, defaults)
        self.kernels = compiled_kernels(fused)
        for group in self.param_groups:
            for p in group["params"]:
                track_touched_rows(p)

    def use_kernels(self, p: Tensor) -> bool:
        """True when the fused kernel can update ``p`` in place (CPU, float32/64, contiguous, matching grad)."""
        return (
            self.kernels is not None
            and p.device.type == "cpu"
            and p.dtype in (torch.float32, torch.float64)
            and p.dim() >= 1
            and p.is_contiguous()
            and p.grad.dtype == p.dtype
            and p.grad.is_contiguous()
        )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                fast = self.kernels is not None and p.device.type == "cpu"
                rows = take_touched_rows(p, self.kernels.union_rows if fast else union_rows)
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} takes dense gradients")
                self.update(p, rows, group)
        return loss

    def update(self, p: Tensor, rows: Tensor | None, group: dict) -> None:
        """Update ``p`` in place from ``p.grad``: only ``rows`` (``[r]`` int64) of dim 0, or all of ``p`` if None."""
        raise NotImplementedError


class LazySGD(LazyOptimizer):
    """SGD (optionally with momentum) that updates only the rows meProp touched; see the module docstring.

    ``fused``: None uses the compiled CPU kernel where it builds, True requires it, False uses torch ops.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float = 0.0,
        clip_value: float | None = None,
        fused: bool | None = None,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, clip_value=clip_value), fused)

    def update(self, p: Tensor, rows: Tensor | None, group: dict) -> None:
        lr, momentum = group["lr"], group["momentum"]
        buf = None
        if momentum:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        if self.use_kernels(p):
            clip = group["clip_value"] or 0.0  # the kernel reads <= 0 as "no clipping"
            self.kernels.lazy_sgd_(p, p.grad, rows, lr, clip, momentum, buf)
            return
        g = (p.grad.clone() if rows is None else p.grad.index_select(0, rows)).contiguous()  # (r, ...) own copy
        g = clipped(g, group["clip_value"])
        if buf is not None:
            if rows is None:
                g = buf.mul_(momentum).add_(g)
            else:
                g = buf.index_select(0, rows).mul_(momentum).add_(g)
                buf.index_copy_(0, rows, g)
        if rows is None:
            p.add_(g, alpha=-lr)
        else:
            p.index_add_(0, rows, g, alpha=-lr)


class LazyAdam(LazyOptimizer):
    """Adam whose moments decay and whose rows move only where meProp touched; see the module docstring.

    State keys match :class:`torch.optim.Adam` (``step``, a float here, ``exp_avg``, ``exp_avg_sq``),
    so helpers that reset Adam's moments work unchanged. ``fused`` as in :class:`LazySGD`.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip_value: float | None = None,
        fused: bool | None = None,
    ) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip_value=clip_value), fused)

    def update(self, p: Tensor, rows: Tensor | None, group: dict) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = 0.0  # a float, not torch's 0-d tensor: one step costs no tensor op
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        m_all, v_all = state["exp_avg"], state["exp_avg_sq"]
        if self.use_kernels(p):
            clip = group["clip_value"] or 0.0  # the kernel reads <= 0 as "no clipping"
            self.kernels.lazy_adam_(p, p.grad, m_all, v_all, rows, group["lr"], beta1, beta2, group["eps"], t, clip)
            return
        g = (p.grad.clone() if rows is None else p.grad.index_select(0, rows)).contiguous()  # (r, ...) own copy
        g = clipped(g, group["clip_value"])
        m = m_all if rows is None else m_all.index_select(0, rows)
        v = v_all if rows is None else v_all.index_select(0, rows)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if rows is not None:
            m_all.index_copy_(0, rows, m)
            v_all.index_copy_(0, rows, v)
        # torch.optim.Adam's update: p -= lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)
        denom = (v.sqrt() / (1.0 - beta2**t) ** 0.5).add_(group["eps"])
        step = m.div(denom).mul_(-group["lr"] / (1.0 - beta1**t))
        if rows is None:
            p.add_(step)
        else:
            p.index_add_(0, rows, step)


class LazyAdagrad(LazyOptimizer):
    """AdaGrad on the rows meProp touched only: exactly :class:`torch.optim.Adagrad` (no lr decay), since a
    zero gradient changes neither a row nor its accumulator. State keys match torch's (``step``, ``sum``).

    ``fused`` as in :class:`LazySGD`.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-2,
        eps: float = 1e-10,
        clip_value: float | None = None,
        fused: bool | None = None,
    ) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(params, dict(lr=lr, eps=eps, clip_value=clip_value), fused)

    def update(self, p: Tensor, rows: Tensor | None, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0.0
            state["sum"] = torch.zeros_like(p)
        state["step"] += 1
        sum_all = state["sum"]
        if self.use_kernels(p):
            clip = group["clip_value"] or 0.0  # the kernel reads <= 0 as "no clipping"
            self.kernels.lazy_adagrad_(p, p.grad, sum_all, rows, group["lr"], group["eps"], clip)
            return
        g = (p.grad.clone() if rows is None else p.grad.index_select(0, rows)).contiguous()  # (r, ...) own copy
        g = clipped(g, group["clip_value"])
        s = sum_all if rows is None else sum_all.index_select(0, rows)
        s.addcmul_(g, g)
        if rows is not None:
            sum_all.index_copy_(0, rows, s)
        step = g.div_(s.sqrt().add_(group["eps"])).mul_(-group["lr"])
        if rows is None:
            p.add_(step)
        else:
            p.index_add_(0, rows, step)

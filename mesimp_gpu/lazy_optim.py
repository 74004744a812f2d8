"""Lazy optimizers: update only the rows of a weight that per-example meProp touched.

With per-example meProp the weight gradient ``dW`` (``[out, in]``) is zero outside the rows of the
kept columns, so an update of the other rows is either a no-op (plain SGD) or only the decay of an
optimizer state. A lazy optimizer arms a touched-row record on each of its parameters
(:mod:`mesimp_gpu.touched_rows`), which the meProp layers fill during backward. :class:`LazySGD`,
:class:`LazyAdam` and :class:`LazyAdagrad` take the record at :meth:`~LazyOptimizer.step` and update
those rows only. Parameters without rows in their record (biases, layers that are not meProp, dense
mode, a parameter that meSimp replaced since the last step) get the ordinary dense update.

The updates are the row launchers of a backend (:class:`~mesimp_gpu.backends.Backend`:
``union_rows``, ``sgd_rows_``, ``adam_rows_``, ``adagrad_rows_``), resolved once per parameter device
from the ``backend`` name: with ``auto``, the cpu backend's compiled kernels on the CPU and the
Triton kernels on CUDA; ``torch`` (or any backend without kernels for a tensor) runs portable torch
ops. Only the backends of devices that hold parameters are loaded, so nothing is compiled for a
device that is not used.

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

from collections.abc import Iterable

import torch
from torch import Tensor

from mesimp_gpu import touched_rows
from mesimp_gpu.backends import BACKEND_NAMES, Backend, BackendCache, is_backend_name


class LazyOptimizer(torch.optim.Optimizer):
    """Shared :meth:`step`: takes each parameter's touched rows and calls :meth:`update` with its device's backend.

    ``backend``: a registry name (``auto`` picks per device, see :mod:`mesimp_gpu.backends`).
    """

    def __init__(self, params: Iterable[Tensor], defaults: dict, backend: str) -> None:
        clip_value = defaults.get("clip_value")
        if clip_value is not None and clip_value <= 0:
            raise ValueError(f"clip_value must be positive, got {clip_value}")
        if defaults["lr"] <= 0:
            raise ValueError(f"learning rate must be positive, got {defaults['lr']}")
        if not is_backend_name(backend):
            raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKEND_NAMES)}")
        self.backend_name = backend
        self._backends = BackendCache()  # per device: the backend whose launchers update its parameters
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                touched_rows.arm(p)
                self.backend_for(p.device)  # fail now (a backend asked for by name), not at the first step

    def backend_for(self, device: torch.device) -> Backend:
        """The backend of this optimizer for parameters on ``device``, resolved on first use and kept."""
        return self._backends.resolve(self.backend_name, device)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                backend = self.backend_for(p.device)
                rows = touched_rows.take(p, backend.union_rows)
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} takes dense gradients")
                self.update(p, rows, group, backend)
        return loss

    def update(self, p: Tensor, rows: Tensor | None, group: dict, backend: Backend) -> None:
        """Update ``p`` in place from ``p.grad``: only ``rows`` (``[r]`` int64) of dim 0, or all of ``p`` if None."""
        raise NotImplementedError


class LazySGD(LazyOptimizer):
    """SGD (optionally with momentum) that updates only the rows meProp touched; see the module docstring."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        momentum: float = 0.0,
        clip_value: float | None = None,
        backend: str = "auto",
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, clip_value=clip_value), backend)

    def update(self, p: Tensor, rows: Tensor | None, group: dict, backend: Backend) -> None:
        momentum, buf = group["momentum"], None
        if momentum:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
        backend.sgd_rows_(p, p.grad, rows, group["lr"], group["clip_value"], momentum, buf)


class LazyAdam(LazyOptimizer):
    """Adam whose moments decay and whose rows move only where meProp touched; see the module docstring.

    State keys match :class:`torch.optim.Adam` (``step``, a float here, ``exp_avg``, ``exp_avg_sq``),
    so helpers that reset Adam's moments work unchanged.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip_value: float | None = None,
        backend: str = "auto",
    ) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, clip_value=clip_value), backend)

    def update(self, p: Tensor, rows: Tensor | None, group: dict, backend: Backend) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0.0  # a float, not torch's 0-d tensor: one step costs no tensor op
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        backend.adam_rows_(p, p.grad, rows, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                           group["betas"], group["eps"], group["clip_value"])


class LazyAdagrad(LazyOptimizer):
    """AdaGrad on the rows meProp touched only: exactly :class:`torch.optim.Adagrad` (no lr decay), since a
    zero gradient changes neither a row nor its accumulator. State keys match torch's (``step``, ``sum``).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-2,
        eps: float = 1e-10,
        clip_value: float | None = None,
        backend: str = "auto",
    ) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(params, dict(lr=lr, eps=eps, clip_value=clip_value), backend)

    def update(self, p: Tensor, rows: Tensor | None, group: dict, backend: Backend) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0.0
            state["sum"] = torch.zeros_like(p)
        state["step"] += 1
        backend.adagrad_rows_(p, p.grad, rows, state["sum"], group["lr"], group["eps"], group["clip_value"])

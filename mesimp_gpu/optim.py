"""Optimizers of the reference (Adam, AdaGrad, SGD) with element-wise gradient clipping."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


class OptimizerName(str, enum.Enum):
    """Optimizers the trainers offer."""

    ADAM = "adam"
    ADAGRAD = "adagrad"
    SGD = "sgd"


#: learning rates of the papers' MNIST runs (SGD: none given; 0.1 as for AdaGrad)
PAPER_LR = {OptimizerName.ADAM: 1e-3, OptimizerName.ADAGRAD: 0.1, OptimizerName.SGD: 0.1}
#: the papers' settings: Adam 0.9/0.999/1e-8; AdaGrad eps 1e-6
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ADAGRAD_EPS = 1e-6


def build_optimizer(
    name: OptimizerName,
    params: Iterable[nn.Parameter],
    lr: float,
    lazy: bool = False,
    clip: float | None = None,
    backend: str = "auto",
) -> torch.optim.Optimizer:
    """A fresh optimizer of kind ``name`` over ``params`` with the papers' hyper-parameters.

    ``lazy`` picks :class:`~mesimp_gpu.lazy_optim.LazyAdam`, ``LazyAdagrad`` or ``LazySGD``, which
    update only the rows per-example meProp touched, with the row launchers of ``backend`` (a registry
    name; ``auto`` picks per device), and clip the gradient themselves at ``clip`` (a dense optimizer
    leaves clipping to :func:`clip_elementwise`).
    """
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    params = list(params)
    if lazy:
        from mesimp_gpu.lazy_optim import LazyAdagrad, LazyAdam, LazySGD  # lazy_optim imports the backends

        if name is OptimizerName.ADAM:
            return LazyAdam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, clip_value=clip, backend=backend)
        if name is OptimizerName.ADAGRAD:
            return LazyAdagrad(params, lr=lr, eps=ADAGRAD_EPS, clip_value=clip, backend=backend)
        return LazySGD(params, lr=lr, clip_value=clip, backend=backend)
    if name is OptimizerName.ADAM:
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    if name is OptimizerName.ADAGRAD:
        return torch.optim.Adagrad(params, lr=lr, eps=ADAGRAD_EPS)
    return torch.optim.SGD(params, lr=lr)


def clip_elementwise(params: Iterable[nn.Parameter], clip: float | None) -> None:
    """Clamp every gradient entry to ``[-clip, clip]`` in place (the reference clips at 5); None: no clipping."""
    if clip is None:
        return
    if clip <= 0:
        raise ValueError(f"clip value must be positive, got {clip}")
    nn.utils.clip_grad_value_(list(params), clip)


def reset_moments(optimizer: torch.optim.Optimizer) -> None:
    """Zero Adam's first and second moments (not its step counter), as the reference does at cycle boundaries."""
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].zero_()


def slice_parameter(
    module: nn.Module, name: str, take: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer | None = None
) -> nn.Parameter:
    """Replace ``module.<name>`` by a new, smaller Parameter ``take(old)`` and carry the optimizer along.

    ``take`` is an indexing that shrinks the tensor, e.g. ``lambda w: w[keep]`` (rows of a
    ``[out, in]`` weight, ``keep`` ``[out]`` bool) or ``lambda w: w[:, keep]`` (columns). The new
    Parameter takes the old one's place in its param group (same position, so the optimizer's
    ``state_dict`` numbering is unchanged), and its state is the old state with every tensor of the
    old parameter's shape sliced by the same ``take``: Adam ``exp_avg``/``exp_avg_sq``
    (``max_exp_avg_sq``), AdaGrad ``sum``, SGD ``momentum_buffer``. Other entries (Adam's ``step``)
    are kept as they are. The old gradient is dropped. Returns the new Parameter.
    """
    old: nn.Parameter = getattr(module, name)
    with torch.no_grad():
        new = nn.Parameter(take(old.detach()).contiguous(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is None:
        return new
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {
            key: take(value).contiguous() if isinstance(value, Tensor) and value.shape == old.shape else value
            for key, value in state.items()
        }
    return new

"""Optimizers of the reference (Adam, AdaGrad, SGD) with element-wise gradient clipping."""

from __future__ import annotations

import enum
from collections.abc import Iterable

import torch
from torch import nn


class OptimizerName(str, enum.Enum):
    """Optimizers the trainers offer."""

    ADAM = "adam"
    ADAGRAD = "adagrad"
    SGD = "sgd"


#: the papers' settings: Adam 0.9/0.999/1e-8; AdaGrad eps 1e-6
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ADAGRAD_EPS = 1e-6


def build_optimizer(name: OptimizerName, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer of kind ``name`` over ``params`` with the papers' hyper-parameters."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    params = list(params)
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

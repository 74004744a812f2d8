"""What every trainer's settings share: the training method, the device, validation and seeding."""

from __future__ import annotations

import enum
import math
import random
from dataclasses import fields
from typing import Any, TypeVar

import numpy as np
import torch

from mesimp_gpu.meprop import MePropMode
from mesimp_gpu.mesimp import MesimpSchedule, PruneOrder

Config = TypeVar("Config")


class Method(str, enum.Enum):
    """Training method of every trainer (meProp applies to the hidden layers, the output layer is dense)."""

    MESIMP = "mesimp"  # meProp top-k plus hit records and prune steps: the model shrinks
    DENSE = "dense"  # full back propagation everywhere
    MEPROP = "meprop"  # per-example top-k (the paper's method)
    UNIFIED = "unified"  # one top-k set per minibatch
    RANDOM = "random"  # k random entries per example (ablation)


#: the meProp mode of each method's hidden layers
METHOD_MODE = {
    Method.MESIMP: MePropMode.TOPK,
    Method.DENSE: MePropMode.DENSE,
    Method.MEPROP: MePropMode.TOPK,
    Method.UNIFIED: MePropMode.UNIFIED,
    Method.RANDOM: MePropMode.RANDOM,
}


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, checked to exist here; raises ValueError with what to do."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) present")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def check_run_settings(config: Any, positive: dict[str, int]) -> None:
    """Validate what every trainer config shares; ``positive`` names further settings that must be >= 1.

    Raises ValueError naming the CLI option: ``positive`` entries, ``cycle`` >= 0, ``prune`` in [0, 1),
    ``limit`` and ``threads`` >= 1 when given, ``lr`` > 0 and ``clip`` > 0 when given.
    """
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if config.cycle < 0:
        raise ValueError(f"--cycle must be at least 0, got {config.cycle}")
    if not 0.0 <= config.prune < 1.0:
        raise ValueError(f"--prune must be in [0, 1), got {config.prune}")
    for name, value in (("limit", config.limit), ("threads", config.threads)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if not 0 < config.lr < math.inf:  # written so that NaN fails too
        raise ValueError(f"--lr must be a positive number, got {config.lr}")
    if config.clip is not None and not 0 < config.clip < math.inf:
        raise ValueError(f"--clip must be a positive number (0 disables clipping), got {config.clip}")


def mesimp_schedule(config: Any) -> MesimpSchedule:
    """The meSimp schedule of a trainer config (its ``prune``, ``cycle`` and ``reset_moments`` fields, and
    ``order`` where the task offers it)."""
    return MesimpSchedule(config.prune, config.cycle, config.reset_moments,
                          getattr(config, "order", PruneOrder.PRUNE_FIRST), config.epochs)


def with_preset(config_class: type[Config], preset: dict[str, Any], settings: dict[str, Any], task: str) -> Config:
    """``config_class`` built from ``preset``'s settings with ``settings`` on top; unknown names are errors."""
    unknown = sorted(set(settings) - {f.name for f in fields(config_class)})
    if unknown:
        raise ValueError(f"unknown {task} settings: {', '.join(unknown)}")
    return config_class(**{**preset, **settings})


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so that a run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

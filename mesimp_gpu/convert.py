"""meProp and meSimp for models this project did not write.

:func:`convert` swaps chosen ``nn.Linear`` modules of any PyTorch model for
:class:`~mesimp_gpu.meprop.MePropLinear` in place. The new module takes over the old one's Parameter
objects (same tensors, so the outputs are the same and an optimizer built before the conversion keeps
working) and changes only the backward pass.

:func:`mesimp_chains` sets up meSimp on ``Linear -> activation -> Linear`` chains, such as the MLP block
of a transformer layer (``linear2(dropout(activation(linear1(x))))`` in ``nn.TransformerEncoderLayer``):
the first layer (converted) records which of its output neurons meProp keeps, and a prune step deletes
the rarely kept ones from the first layer's rows and the second layer's columns, optimizer state
included. That is exact only when the second layer reads the first one's outputs through an
element-wise function and nothing else does, which the caller knows and this module cannot check.

Which modules are converted is decided by name (``model.named_modules()``, e.g. ``layers.0.linear1``)
with shell-style patterns (:mod:`fnmatch`). Only modules of type ``nn.Linear`` itself are taken:
subclasses may be read by their parents without calling ``forward`` (``nn.MultiheadAttention`` reads
its ``out_proj`` weights directly), where a swapped forward would silently do nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode
from mesimp_gpu.mesimp import prune_mask


def _patterns(value: str | Iterable[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def convert(
    model: nn.Module,
    k: int = 20,
    mode: MePropMode | str = MePropMode.TOPK,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    backend: str = "auto",
    sparse_bias: bool = False,
) -> list[str]:
    """Replace the chosen ``nn.Linear`` modules of ``model`` by :class:`MePropLinear`, in place.

    ``include``: name patterns of the modules to convert (None: every ``nn.Linear``); ``exclude``:
    patterns of modules to leave alone, applied after ``include``. ``k``, ``mode``, ``backend`` and
    ``sparse_bias`` form each new layer's :class:`MePropConfig`. Returns the converted names.

    Raises ValueError for a pattern of ``include`` that matches no ``nn.Linear`` (naming the modules of
    other types it matched, if any), and when nothing at all would be converted.
    """
    config = MePropConfig(MePropMode(mode), k, backend, sparse_bias)
    include, exclude = _patterns(include), _patterns(exclude)
    modules = dict(model.named_modules())
    linear = [name for name, m in modules.items() if type(m) is nn.Linear]
    for pattern in include:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in linear):
            others = [f"{name} ({type(m).__name__})" for name, m in modules.items() if fnmatch.fnmatchcase(name, pattern)]
            found = f"; it matches only {', '.join(others)}, which are not nn.Linear" if others else ""
            raise ValueError(f"include pattern {pattern!r} matches no nn.Linear module of the model{found}")
    chosen = [
        name for name in linear
        if (not include or any(fnmatch.fnmatchcase(name, p) for p in include))
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    if not chosen:
        raise ValueError("no nn.Linear module to convert: check include and exclude against model.named_modules()")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, from_linear(modules[name], config))
    return chosen


def from_linear(linear: nn.Linear, config: MePropConfig) -> MePropLinear:
    """A :class:`MePropLinear` with ``config`` that holds ``linear``'s own Parameters (and its training mode)."""
    layer = MePropLinear(linear.in_features, linear.out_features, config, bias=linear.bias is not None)
    layer.weight = linear.weight
    if linear.bias is not None:
        layer.bias = linear.bias
    return layer.train(linear.training)


@dataclass
class Chain:
    """One ``first -> element-wise activation -> second`` pair: ``name`` is the parent module's name."""

    name: str
    first: MePropLinear
    second: nn.Linear | MePropLinear


class LinearChains:
    """meSimp over the chains found by :func:`mesimp_chains`: a :class:`~mesimp_gpu.mesimp.Prunable`, so
    :class:`~mesimp_gpu.mesimp.MesimpSchedule` can drive it as it drives the project's models."""

    def __init__(self, chains: list[Chain]) -> None:
        self.chains = chains

    @property
    def sizes(self) -> list[int]:
        """The hidden width of each chain (the first layer's outputs; they shrink under meSimp)."""
        return [c.first.out_features for c in self.chains]

    def mesimp_prune_(self, threshold: float, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """Delete each chain's hidden neurons with ``hits < floor(refer * threshold)`` (the most-hit one always
        stays) from the first layer's rows and the second layer's columns, with their optimizer state;
        reset the records; return the new sizes."""
        for c in self.chains:
            keep = prune_mask(c.first.hits, c.first.refer, threshold)
            if not bool(keep.all()):
                c.first.prune_outputs_(keep, c.second, optimizer)
            c.first.reset_record_()
        return self.sizes


def mesimp_chains(model: nn.Module, first: str, second: str) -> LinearChains:
    """Set up meSimp on every submodule of ``model`` that has children named ``first`` and ``second``
    (dotted paths below it, e.g. ``"linear1"`` and ``"linear2"`` of each ``nn.TransformerEncoderLayer``).

    ``first`` must already be a :class:`MePropLinear` (:func:`convert` it), whose outputs ``second`` (an
    ``nn.Linear`` or :class:`MePropLinear`) reads through an element-wise function only. Gives every
    ``first`` a zeroed hit record (on its weights' device), which it fills while training.
    Raises ValueError when no submodule has both, or when a pair does not fit.
    """
    chains = []
    for name, parent in model.named_modules():
        if not (_has(parent, first) and _has(parent, second)):
            continue
        a, b = parent.get_submodule(first), parent.get_submodule(second)
        where = f"{name + '.' if name else ''}{first}"
        if not isinstance(a, MePropLinear):
            raise ValueError(f"{where} is a {type(a).__name__}; convert it to MePropLinear first (mesimp_gpu.convert)")
        if type(b) is not nn.Linear and not isinstance(b, MePropLinear):
            raise ValueError(f"{name + '.' if name else ''}{second} is a {type(b).__name__}, not a Linear layer")
        if b.in_features != a.out_features:
            raise ValueError(f"{where} has {a.out_features} outputs but {second} reads {b.in_features} inputs")
        if a.hits is None:
            a.hits = torch.zeros(a.out_features, dtype=torch.long, device=a.weight.device)
        a.reset_record_()
        chains.append(Chain(name, a, b))
    if not chains:
        raise ValueError(f"no module of the model has both {first!r} and {second!r} below it")
    return LinearChains(chains)


def _has(module: nn.Module, path: str) -> bool:
    """Whether ``module`` has a submodule at the dotted ``path``."""
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True

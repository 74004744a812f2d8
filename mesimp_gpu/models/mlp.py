"""The multi-layer perceptron of the papers: 784-H-...-H-10, ReLU, meProp on hidden layers."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode
from mesimp_gpu.mesimp import prune_mask
from mesimp_gpu.models.saved import load_model, meprop_config, meprop_settings, save_model

#: ``format`` tag of the architecture JSON written by :func:`save_mlp`
MLP_FORMAT = "mesimp-gpu/mlp-v1"


class BiasGrad(str, enum.Enum):
    """What the hidden layers' biases learn from under meProp."""

    DENSE = "dense"  # sum_b G[b, :] over every entry (the C# program)
    KEPT = "kept"  # only the kept top-k entries, as the weights
    FROZEN = "frozen"  # no gradient, every layer's biases stay at their initial values (what the authors'
    #                    PyTorch script does: its per-example backward returns no bias gradient)


class Init(str, enum.Enum):
    """How the MLP's weights and biases start."""

    NORMAL = "normal"  # the C# program: W ~ N(0, std = sqrt(6 / (fan_in + fan_out))), b = 0
    UNIFORM = "uniform"  # the authors' PyTorch script: W and b ~ U(-1/sqrt(fan_out), 1/sqrt(fan_out))


class MLP(nn.Module):
    """``sizes = [in, h1, ..., hL, classes]``; hidden layers use ``config``, the output layer is dense.

    Input ``[B, in]`` -> logits ``[B, classes]``. ``meprop_output`` applies ``config`` to the output
    layer too (the papers back-propagate it fully). ``track_hits`` records meSimp hits on hidden layers,
    by the C#'s rule with ``reference_hits`` (:func:`~mesimp_gpu.mesimp.reference_hits`). ``dropout``
    (a probability) follows every hidden ReLU in training; ``init`` picks the initialisation and
    ``bias_grad`` what the biases learn from.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        config: MePropConfig,
        meprop_output: bool = False,
        track_hits: bool = False,
        reference_hits: bool = False,
        dropout: float = 0.0,
        init: Init = Init.NORMAL,
        bias_grad: BiasGrad = BiasGrad.DENSE,
    ) -> None:
        super().__init__()
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"MLP sizes must be at least [in, out], all positive; got {list(sizes)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        dense = replace(config, mode=MePropMode.DENSE)
        if BiasGrad(bias_grad) is BiasGrad.KEPT:
            config = replace(config, sparse_bias=True)
        last = len(sizes) - 2
        self.layers = nn.ModuleList(
            MePropLinear(
                sizes[i],
                sizes[i + 1],
                config if (i < last or meprop_output) else dense,
                track_hits=track_hits and i < last,
                reference_hits=reference_hits and track_hits and i < last,
            )
            for i in range(len(sizes) - 1)
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if Init(init) is Init.UNIFORM:
            with torch.no_grad():
                for layer in self.layers:
                    bound = 1.0 / math.sqrt(layer.out_features)
                    layer.weight.uniform_(-bound, bound)
                    if layer.bias is not None:
                        layer.bias.uniform_(-bound, bound)
        if BiasGrad(bias_grad) is BiasGrad.FROZEN:
            for layer in self.layers:
                if layer.bias is not None:
                    layer.bias.requires_grad_(False)

    @property
    def sizes(self) -> list[int]:
        """Current layer widths ``[in, h1, ..., classes]`` (they shrink under meSimp)."""
        return [self.layers[0].in_features] + [layer.out_features for layer in self.layers]

    @property
    def hidden(self) -> list[MePropLinear]:
        """The hidden layers (all but the output layer)."""
        return list(self.layers[:-1])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.dropout(nn.functional.relu(layer(x)))
        return self.layers[-1](x)

    def mesimp_prune_(self, threshold: float, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """One meSimp prune step on every hidden layer; returns the new hidden sizes.

        All keep masks come from the same record (taken before any slicing), then the record resets.
        """
        hidden = self.hidden
        if any(layer.hits is None for layer in hidden):
            raise ValueError("meSimp needs hit records: build the MLP with track_hits=True")
        keeps = [prune_mask(layer.hits, layer.refer, threshold) for layer in hidden]
        for i, keep in enumerate(keeps):
            if not bool(keep.all()):
                self.layers[i].prune_outputs_(keep, self.layers[i + 1], optimizer)
        for layer in hidden:
            layer.reset_record_()
        return [layer.out_features for layer in hidden]


def save_mlp(model: MLP, directory: str | Path) -> Path:
    """Write ``model`` (current sizes, meProp settings) as ``model.json`` + ``model.pt`` into ``directory``;
    returns the JSON path. A meSimp-shrunk model keeps its shape."""
    return save_model(model, directory, MLP_FORMAT,
                      {"sizes": model.sizes, "meprop": meprop_settings(model.layers[0].config)})


def load_mlp(path: str | Path, device: torch.device | str = "cpu") -> MLP:
    """Load what :func:`save_mlp` wrote; ``path`` is the ``model.json`` or its folder. ValueError if unreadable."""
    return load_model(path, MLP_FORMAT, "an MLP", lambda arch: MLP(arch["sizes"], meprop_config(arch["meprop"])),
                      device)[0]

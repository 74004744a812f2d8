"""The multi-layer perceptron of the papers: 784-H-...-H-10, ReLU, meProp on hidden layers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode


class MLP(nn.Module):
    """``sizes = [in, h1, ..., hL, classes]``; hidden layers use ``config``, the output layer is dense.

    Input ``[B, in]`` -> logits ``[B, classes]``. ``meprop_output`` applies ``config`` to the output
    layer too (the papers back-propagate it fully). ``track_hits`` records meSimp hits on hidden layers.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        config: MePropConfig,
        meprop_output: bool = False,
        track_hits: bool = False,
    ) -> None:
        super().__init__()
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"MLP sizes must be at least [in, out], all positive; got {list(sizes)}")
        dense = MePropConfig(MePropMode.DENSE, config.k, config.backend, config.sparse_bias)
        last = len(sizes) - 2
        self.layers = nn.ModuleList(
            MePropLinear(
                sizes[i],
                sizes[i + 1],
                config if (i < last or meprop_output) else dense,
                track_hits=track_hits and i < last,
            )
            for i in range(len(sizes) - 1)
        )

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
            x = nn.functional.relu(layer(x))
        return self.layers[-1](x)

"""The transition parser's network (Chen & Manning 2014; the meProp and meSimp papers' parsing task).

A configuration's 48 feature ids (:mod:`mesimp_gpu.parsing.features`: 18 words, 18 tags, 12 labels)
are embedded (``dim`` each, 50 in the papers) and concatenated into ``48 * dim`` inputs (2,400), fed to
one meProp hidden layer (500 units in the papers, meProp/meSimp apply here), an activation (``cube``,
Chen & Manning's, or ``relu``), dropout, and a dense output layer over the ``2L + 1`` transitions.
Dropout may also act on the embeddings (``input_dropout``).

meSimp prunes hidden units: the hidden layer's weight rows and bias and the output layer's input
columns are deleted for real (:meth:`Parser.mesimp_prune_`).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode
from mesimp_gpu.mesimp import prune_mask
from mesimp_gpu.models.saved import load_model, meprop_config, meprop_settings, save_model
from mesimp_gpu.parsing.features import N_FEATURES, N_LABEL_FEATURES, N_TAG_FEATURES, N_WORD_FEATURES

#: ``format`` tag of the architecture JSON written by :func:`save_parser`
PARSER_FORMAT = "mesimp-gpu/parser-v1"
#: embeddings start at ``U(-EMBEDDING_INIT, EMBEDDING_INIT)`` (no pretrained vectors here)
EMBEDDING_INIT = 0.01


class Activation(str, enum.Enum):
    """The hidden layer's non-linearity."""

    CUBE = "cube"  # Chen & Manning: h = z^3 (captures products of three features)
    RELU = "relu"


@dataclass(frozen=True)
class ParserShape:
    """What the network's tensors are sized by: vocabulary sizes, widths and the activation."""

    words: int  # word vocabulary size (NULL, UNK, ROOT included)
    tags: int  # tag vocabulary size
    labels: int  # label vocabulary size (NULL, UNK included)
    outputs: int  # transitions, 2L + 1
    hidden: int = 500  # hidden units (shrinks under meSimp)
    dim: int = 50  # embedding size of words, tags and labels
    activation: Activation = Activation.CUBE
    dropout: float = 0.5  # on the hidden layer's output, in training
    input_dropout: float = 0.0  # on the concatenated embeddings, in training


class Parser(nn.Module):
    """Feature ids ``[B, 48]`` -> transition scores ``[B, 2L + 1]``; see the module docstring."""

    def __init__(self, shape: ParserShape, config: MePropConfig, track_hits: bool = False) -> None:
        super().__init__()
        if min(shape.words, shape.tags, shape.labels) < 3 or shape.outputs < 1:
            raise ValueError(f"vocabularies too small for a parser: {shape}")
        if not (0.0 <= shape.dropout < 1.0 and 0.0 <= shape.input_dropout < 1.0):
            raise ValueError(f"dropout rates must be in [0, 1), got {shape.dropout} and {shape.input_dropout}")
        self.shape = shape
        self.words = nn.Embedding(shape.words, shape.dim)
        self.tags = nn.Embedding(shape.tags, shape.dim)
        self.labels = nn.Embedding(shape.labels, shape.dim)
        for table in (self.words, self.tags, self.labels):
            nn.init.uniform_(table.weight, -EMBEDDING_INIT, EMBEDDING_INIT)
        self.hidden = MePropLinear(N_FEATURES * shape.dim, shape.hidden, config, track_hits=track_hits)
        self.output = MePropLinear(shape.hidden, shape.outputs, replace(config, mode=MePropMode.DENSE))
        self.dropout = nn.Dropout(shape.dropout)
        self.input_dropout = nn.Dropout(shape.input_dropout)

    @property
    def hidden_size(self) -> int:
        """Current number of hidden units (it shrinks under meSimp)."""
        return self.hidden.out_features

    def dense_parameters(self) -> list[nn.Parameter]:
        """The parameters outside meProp's sparse gradient (embeddings, output layer): L2 applies to these."""
        return [self.words.weight, self.tags.weight, self.labels.weight, *self.output.parameters()]

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != N_FEATURES:
            raise ValueError(f"expected feature ids [batch, {N_FEATURES}], got {tuple(features.shape)}")
        tag_start, label_start = N_WORD_FEATURES, N_WORD_FEATURES + N_TAG_FEATURES
        x = torch.cat([
            self.words(features[:, :tag_start]).flatten(1),  # (B, 18 * dim)
            self.tags(features[:, tag_start:label_start]).flatten(1),  # (B, 18 * dim)
            self.labels(features[:, label_start : label_start + N_LABEL_FEATURES]).flatten(1),  # (B, 12 * dim)
        ], dim=1)
        z = self.hidden(self.input_dropout(x))  # (B, hidden)
        h = z * z * z if self.shape.activation is Activation.CUBE else torch.relu(z)
        return self.output(self.dropout(h))

    def mesimp_prune_(self, threshold: float, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """Delete the hidden units with ``hits < floor(refer * threshold)`` (and the output layer's columns
        for them, optimizer state included), reset the record; returns ``[hidden units]``."""
        if self.hidden.hits is None:
            raise ValueError("meSimp needs hit records: build the parser with track_hits=True")
        keep = prune_mask(self.hidden.hits, self.hidden.refer, threshold)
        if not bool(keep.all()):
            self.hidden.prune_outputs_(keep, self.output, optimizer)
        self.hidden.reset_record_()
        return [self.hidden_size]


def save_parser(model: Parser, vocab_state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``model.json`` (architecture at its current size, meProp settings, vocabularies) and
    ``model.pt`` (parameters) into ``directory``; returns the JSON path."""
    shape = replace(model.shape, hidden=model.hidden_size)
    return save_model(model, directory, PARSER_FORMAT, {
        "shape": {**asdict(shape), "activation": shape.activation.value},
        "meprop": meprop_settings(model.hidden.config),
        "vocab": vocab_state,
    })


def load_parser(path: str | Path, device: torch.device | str = "cpu") -> tuple[Parser, dict[str, Any]]:
    """Load what :func:`save_parser` wrote (``path``: the ``model.json`` or its folder) -> (parser in evaluation
    mode, vocab state). FileNotFoundError or ValueError, naming the file, when it is missing or unreadable."""

    def build(arch: dict[str, Any]) -> Parser:
        shape = ParserShape(**{**arch["shape"], "activation": Activation(arch["shape"]["activation"])})
        return Parser(shape, meprop_config(arch["meprop"]))

    model, arch = load_model(path, PARSER_FORMAT, "a parser", build, device)
    return model.eval(), arch["vocab"]

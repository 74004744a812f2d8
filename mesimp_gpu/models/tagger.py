"""The POS tagger: embeddings + shape features (+ a character CNN) -> meProp LSTM -> softmax.

Per token: a word embedding (``word_dim``, 50 in the paper) concatenated with one embedding
(``feature_dim``, 20) per shape feature (:data:`~mesimp_gpu.data.conllu.SHAPE_FEATURES`, 7 as in the
paper) and, with ``char_filters > 0``, a character-level word vector (:class:`CharCNN`), fed through
dropout to a :class:`~mesimp_gpu.lstm.MePropLSTM` (hidden 500 in the paper, optionally
bidirectional: both directions are meProp/meSimp layers), whose output goes through dropout and a plain
``nn.Linear`` (full back propagation) to tag scores.

The character CNN is a convolution and max-pooling, not a linear layer over the network's hidden state:
it keeps full back propagation (its gradient reaches only the max-pooled positions anyway), and meProp
and meSimp act on the LSTM, where the time goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mesimp_gpu.data.conllu import IGNORE_TAG, PAD_ID, Batch
from mesimp_gpu.lstm import GateSelection, HitCounting, MePropLSTM
from mesimp_gpu.meprop import MePropConfig
from mesimp_gpu.models.saved import load_model, meprop_config, meprop_settings, save_model

#: ``format`` tag of the architecture JSON written by :func:`save_tagger`
TAGGER_FORMAT = "mesimp-gpu/tagger-v1"


class CharCNN(nn.Module):
    """Character-level word vectors: character embeddings ``[N, C, char_dim]`` -> a width-``width``
    convolution to ``filters`` channels -> max over the word's characters -> tanh ``[N, filters]``."""

    def __init__(self, vocab_size: int, char_dim: int, filters: int, width: int = 3) -> None:
        super().__init__()
        if vocab_size < 2 or char_dim < 1 or filters < 1 or width < 1 or width % 2 == 0:
            raise ValueError(f"character CNN needs vocabulary >= 2, positive sizes and an odd width; got vocabulary "
                             f"{vocab_size}, dim {char_dim}, filters {filters}, width {width}")
        self.embedding = nn.Embedding(vocab_size, char_dim, padding_idx=PAD_ID)
        self.conv = nn.Conv1d(char_dim, filters, width, padding=width // 2)  # same length: one output per character

    def forward(self, chars: Tensor) -> Tensor:
        """``chars`` ``[N, C]`` character ids (``PAD_ID`` after each word's end, at least one real) -> ``[N, filters]``."""
        real = chars != PAD_ID  # (N, C)
        convolved = self.conv(self.embedding(chars).transpose(1, 2))  # (N, filters, C)
        convolved = convolved.masked_fill(~real.unsqueeze(1), float("-inf"))  # padding never wins the max
        return torch.tanh(convolved.max(dim=2).values)


class Tagger(nn.Module):
    """Sequence tagger; :meth:`forward` maps a :class:`Batch` to logits ``[B, T, tags]``."""

    def __init__(
        self,
        vocab_size: int,
        feature_sizes: list[int],
        tag_count: int,
        config: MePropConfig,
        hidden: int = 500,
        word_dim: int = 50,
        feature_dim: int = 20,
        bidirectional: bool = False,
        selection: GateSelection = GateSelection.PER_GATE,
        counting: HitCounting = HitCounting.ANY,
        track_hits: bool = False,
        char_vocab_size: int = 0,
        char_dim: int = 30,
        char_filters: int = 0,
        char_width: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        #: the constructor's sizes and choices (not the config), enough to rebuild the tagger
        self.build = dict(vocab_size=vocab_size, feature_sizes=list(feature_sizes), tag_count=tag_count, hidden=hidden,
                          word_dim=word_dim, feature_dim=feature_dim, bidirectional=bidirectional,
                          selection=GateSelection(selection).value, counting=HitCounting(counting).value,
                          char_vocab_size=char_vocab_size, char_dim=char_dim, char_filters=char_filters,
                          char_width=char_width, dropout=dropout)
        if vocab_size < 2 or tag_count < 1 or any(n < 2 for n in feature_sizes):
            raise ValueError(
                f"vocabularies too small: words {vocab_size}, features {feature_sizes}, tags {tag_count}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.words = nn.Embedding(vocab_size, word_dim, padding_idx=PAD_ID)
        self.features = nn.ModuleList(nn.Embedding(n, feature_dim, padding_idx=PAD_ID) for n in feature_sizes)
        self.chars = CharCNN(char_vocab_size, char_dim, char_filters, char_width) if char_filters > 0 else None
        self.dropout = nn.Dropout(dropout)  # on the LSTM's input and on its output
        self.lstm = MePropLSTM(
            word_dim + feature_dim * len(feature_sizes) + char_filters, hidden, config, bidirectional=bidirectional,
            selection=selection, counting=counting, track_hits=track_hits,
        )
        self.output = nn.Linear(self.lstm.output_size, tag_count)

    def char_vectors(self, chars: Tensor) -> Tensor:
        """``chars`` ``[B, T, C]`` -> character-level word vectors ``[B, T, char_filters]`` (zeros at padding);
        only the real tokens go through the CNN."""
        real = chars[:, :, 0] != PAD_ID  # (B, T): every real token has at least one character
        out = chars.new_zeros((*chars.shape[:2], self.chars.conv.out_channels), dtype=self.chars.conv.weight.dtype)
        out[real] = self.chars(chars[real])
        return out

    def forward(self, batch: Batch) -> Tensor:
        """``batch`` (words ``[B, T]``, features ``[B, T, F]``, chars ``[B, T, C]``, lengths ``[B]``) -> logits
        ``[B, T, tags]``."""
        if batch.features.shape[2] != len(self.features):
            raise ValueError(f"batch has {batch.features.shape[2]} features, the tagger expects {len(self.features)}")
        parts = [self.words(batch.words)]
        parts += [emb(batch.features[:, :, i]) for i, emb in enumerate(self.features)]
        if self.chars is not None:
            parts.append(self.char_vectors(batch.chars))
        inputs = self.dropout(torch.cat(parts, dim=2))  # (B, T, I)
        hidden = self.lstm(inputs, lengths=batch.lengths)  # (B, T, H_total)
        return self.output(self.dropout(hidden))

    def loss(self, logits: Tensor, tags: Tensor) -> Tensor:
        """Cross-entropy summed over the real tokens (padding carries :data:`IGNORE_TAG`)."""
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tags.reshape(-1), ignore_index=IGNORE_TAG, reduction="sum"
        )

    def mesimp_prune_(self, threshold: float, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """Prune the LSTM's rarely selected units (and the output layer's columns); return kept sizes."""
        return self.lstm.mesimp_prune_(threshold, self.output, optimizer)

    @property
    def hidden_sizes(self) -> list[int]:
        """Hidden units per LSTM direction (they shrink under meSimp)."""
        return [d.hidden_size for d in self.lstm.directions]

    def shrink_to_(self, hidden_sizes: list[int]) -> None:
        """Cut each direction to its first ``hidden_sizes[d]`` units (to load a pruned model's weights over it)."""
        keeps = [torch.arange(d.hidden_size) < n for d, n in zip(self.lstm.directions, hidden_sizes)]
        self.lstm.prune_units_(keeps, self.output)


def save_tagger(model: Tagger, vocab_state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``model.json`` (sizes at their current, possibly pruned, values, meProp settings, vocabularies)
    and ``model.pt`` (parameters) into ``directory``; returns the JSON path."""
    return save_model(model, directory, TAGGER_FORMAT, {
        "build": model.build, "hidden_sizes": model.hidden_sizes, "meprop": meprop_settings(model.lstm.config),
        "vocab": vocab_state,
    })


def load_tagger(path: str | Path, device: torch.device | str = "cpu") -> tuple[Tagger, dict[str, Any]]:
    """Load what :func:`save_tagger` wrote (``path``: the ``model.json`` or its folder) -> (tagger in evaluation
    mode, vocab state). FileNotFoundError or ValueError, naming the file, when it is missing or unreadable."""

    def build(arch: dict[str, Any]) -> Tagger:
        model = Tagger(config=meprop_config(arch["meprop"]), **arch["build"])
        model.shrink_to_(arch["hidden_sizes"])
        return model

    model, arch = load_model(path, TAGGER_FORMAT, "a tagger", build, device)
    return model.eval(), arch["vocab"]

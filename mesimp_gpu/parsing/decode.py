"""Greedy arc-standard decoding, batched over sentences: one scorer call per step for a whole batch.

Each step extracts the features of every unfinished configuration of the batch (``[m, 48]``), scores
them with one call (``[m, 2L + 1]``), masks illegal transitions with ``-inf`` and applies the best
legal one. A sentence of ``n`` words finishes after exactly ``2n`` steps; the legality rules of
:mod:`mesimp_gpu.parsing.transitions` make every output a single-rooted tree over all its words.
Sentences are batched in order of length, so that a batch's sentences finish at about the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from mesimp_gpu.data.conllu import Sentence
from mesimp_gpu.parsing.features import FeatureTable, ParserVocab, positions
from mesimp_gpu.parsing.transitions import Configuration

#: feature ids ``[m, 48]`` (int64, on the CPU) -> transition scores ``[m, 2L + 1]`` on any device
Scorer = Callable[[Tensor], Tensor]


def parse_sentences(
    sentences: Sequence[Sentence], vocab: ParserVocab, score: Scorer, batch_size: int = 1024
) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """Parse ``sentences`` greedily; ``(heads, deprels)`` per sentence, in input order.

    ``heads[i]`` is the head of word ``i + 1`` (0 = ROOT) and ``deprels[i]`` its label. Words and tags
    come from each sentence's FORM and :attr:`ParserVocab.tagset` column (replace that column with
    predicted tags to parse without gold tags); HEAD and DEPREL are not read. ``score`` runs under
    ``torch.no_grad``; it receives CPU tensors and moves them to its own device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for sentence in sentences:
        if not sentence.words:
            raise ValueError(f"{sentence.source}: cannot parse a sentence without words")
    order = sorted(range(len(sentences)), key=lambda k: len(sentences[k].words))
    results: list[tuple[tuple[int, ...], tuple[str, ...]]] = [((), ())] * len(sentences)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for k, parse in zip(batch, _parse_batch([sentences[k] for k in batch], vocab, score)):
                results[k] = parse
    return results


def _parse_batch(
    sentences: Sequence[Sentence], vocab: ParserVocab, score: Scorer
) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """Greedy parses of one batch, advancing every unfinished sentence one transition per step."""
    system = vocab.system
    table = FeatureTable([vocab.encode(s) for s in sentences])
    configs = [Configuration(len(s.words)) for s in sentences]
    active = list(range(len(configs)))
    while active:
        flat: list[int] = []
        for k in active:
            positions(configs[k], flat)
        features = torch.from_numpy(table.features(flat, np.asarray(active, dtype=np.int64)))
        scores = score(features)
        if scores.shape != (len(active), system.n_outputs):
            expected = (len(active), system.n_outputs)
            raise ValueError(f"score returned shape {tuple(scores.shape)}, expected {expected}")
        legal = system.legal_masks([configs[k] for k in active]).to(scores.device)
        best = scores.masked_fill(~legal, float("-inf")).argmax(dim=1).tolist()
        for k, transition in zip(active, best):
            dependent = system.apply(configs[k], transition)
            if dependent > 0:  # an arc: its label becomes visible to later features
                table.set_label(k, dependent, configs[k].labels[dependent])
        active = [k for k in active if not configs[k].is_final]
    return [
        (tuple(c.heads[1:]), tuple(system.labels[label] for label in c.labels[1:])) for c in configs
    ]

"""Chen & Manning (2014) features of an arc-standard configuration: 18 words, 18 tags, 12 labels.

Positions (``s1`` = top of the stack, ``b1`` = first buffer word; ``lc1``/``lc2`` the first and second
leftmost children, ``rc1``/``rc2`` the first and second rightmost)::

    s1 s2 s3 b1 b2 b3                                          6 words and tags
    lc1(s1) rc1(s1) lc2(s1) rc2(s1) lc1(lc1(s1)) rc1(rc1(s1))  6 words, tags and labels
    lc1(s2) rc1(s2) lc2(s2) rc2(s2) lc1(lc1(s2)) rc1(rc1(s2))  6 words, tags and labels

A feature vector is ``[48]`` int64: the 18 positions' word ids, then their tag ids, then the labels of
the 12 child positions (:data:`FEATURE_NAMES`). A missing position is ``NULL``; ROOT's word and tag
are ``ROOT``. Children are those left (``lc``) or right (``rc``) of their head, as in Chen & Manning.

Vocabularies (:class:`ParserVocab`, from train): words are normalised as the tagger does (lower case,
digits as ``0``; :func:`mesimp_gpu.data.conllu.normalise_word`): without pretrained embeddings, case
would split the few occurrences of rare words. Every train word is kept (``word_min_count=1``, Chen &
Manning's cut-off); others map to ``UNK``. Word and tag ids: ``NULL`` = 0, ``UNK`` = 1, ``ROOT`` = 2,
then train items; label ids: ``NULL`` = 0, ``UNK`` = 1, then ``2 + l`` for label index ``l`` of the
transition system. ``NULL`` = 0 and ``UNK`` = 1 equal the tagger's ``PAD_ID`` and ``UNK_ID``, so
:func:`mesimp_gpu.data.conllu.word_dropout` applies to the word columns with
:meth:`ParserVocab.word_counts`.

Speed: the per-configuration work in Python is only the 18 positions (list look-ups); ids come from one
NumPy gather over all configurations. On UD English EWT train (12,544 sentences; 288 non-projective ones
skipped; 392,214 transitions) :func:`training_examples` takes 2.9-3.1 s, and :meth:`ParserVocab.build`
0.6 s, in one process on an Intel Xeon (AVX-512, 2 cores).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mesimp_gpu.data.conllu import Sentence, TagSet, check_tree, normalise_word
from mesimp_gpu.parsing.transitions import ArcStandard, Configuration, is_projective, oracle_arrays

NULL, UNK, ROOT = "<null>", "<unk>", "<root>"
NULL_ID, UNK_ID, ROOT_ID = 0, 1, 2
#: label id of label index ``l`` is ``LABEL_OFFSET + l``
LABEL_OFFSET = 2
N_WORD_FEATURES, N_TAG_FEATURES, N_LABEL_FEATURES = 18, 18, 12
N_FEATURES = N_WORD_FEATURES + N_TAG_FEATURES + N_LABEL_FEATURES

_CHILDREN = ("lc1", "rc1", "lc2", "rc2", "lc1.lc1", "rc1.rc1")
_POSITIONS = ("s1", "s2", "s3", "b1", "b2", "b3", *(f"{c}.{s}" for s in ("s1", "s2") for c in _CHILDREN))
#: name of each of the 48 features, e.g. ``s1.word``, ``lc1.lc1.s2.tag`` (leftmost child of the leftmost
#: child of s2), ``rc2.s1.label``
FEATURE_NAMES: tuple[str, ...] = (
    *(f"{p}.word" for p in _POSITIONS),
    *(f"{p}.tag" for p in _POSITIONS),
    *(f"{p}.label" for p in _POSITIONS[6:]),
)


class FeatureVocab:
    """String <-> id: the special tokens first, then ``items`` in order; unknown strings map to ``UNK_ID``."""

    def __init__(self, specials: Sequence[str], items: Iterable[str]) -> None:
        self.itos: list[str] = [*specials, *items]
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary items must be distinct and differ from the special tokens")

    def __len__(self) -> int:
        return len(self.itos)

    def index(self, item: str) -> int:
        """Id of ``item``, ``UNK_ID`` when unknown."""
        return self.stoi.get(item, UNK_ID)


@dataclass(frozen=True)
class SentenceIds:
    """Word and tag ids of one sentence with ROOT first: ``words`` and ``tags`` ``[n + 1]`` (int64)."""

    words: np.ndarray
    tags: np.ndarray


class ParserVocab:
    """Word, tag and label vocabularies and the transition system, built from the training sentences.

    ``word_count_by_item`` holds train counts of the normalised words (for word dropout).
    """

    def __init__(self, word_counts: Counter[str], tags: Iterable[str], labels: Iterable[str], tagset: TagSet,
                 n_sentences: int, word_min_count: int = 1) -> None:
        kept = sorted((w for w, c in word_counts.items() if c >= word_min_count), key=lambda w: (-word_counts[w], w))
        self.words = FeatureVocab((NULL, UNK, ROOT), kept)
        self.tags = FeatureVocab((NULL, UNK, ROOT), sorted(tags))
        self.system = ArcStandard(sorted(labels))
        self.labels = FeatureVocab((NULL, UNK), self.system.labels)
        self.tagset = tagset
        self.word_count_by_item = Counter({w: word_counts[w] for w in kept})
        self.n_sentences = n_sentences
        self.word_min_count = word_min_count

    @classmethod
    def build(cls, train: Sequence[Sentence], tagset: TagSet = TagSet.XPOS, word_min_count: int = 1) -> ParserVocab:
        """Vocabularies from ``train`` (sentences with trees); words rarer than ``word_min_count`` map to UNK."""
        if not train:
            raise ValueError("cannot build vocabularies from an empty training set")
        for sentence in train:
            check_tree(sentence)
            if "_" in sentence.tags(tagset):
                raise ValueError(f"{sentence.source}: sentence has no {tagset.value.upper()} tags ('_')")
        words = Counter(normalise_word(w) for s in train for w in s.words)
        tags = {t for s in train for t in s.tags(tagset)}
        labels = {d for s in train for d in s.deprels}
        return cls(words, tags, labels, tagset, len(train), word_min_count)

    def encode(self, sentence: Sentence) -> SentenceIds:
        """Ids of ``sentence``'s words and tags (column :attr:`tagset`), ROOT first; unknown ones are UNK."""
        words = [ROOT_ID, *(self.words.index(normalise_word(w)) for w in sentence.words)]
        tags = [ROOT_ID, *(self.tags.index(t) for t in sentence.tags(self.tagset))]
        return SentenceIds(np.array(words, dtype=np.int64), np.array(tags, dtype=np.int64))

    def label_indices(self, sentence: Sentence) -> list[int]:
        """Label index of each word's DEPREL; ValueError naming the sentence for a label unseen in train."""
        try:
            return [self.system.label_index[d] for d in sentence.deprels]
        except KeyError as exc:
            raise ValueError(f"{sentence.source}: DEPREL {exc.args[0]!r} was not seen in train") from None

    def word_counts(self) -> Tensor:
        """Train count of each word id ``[V]`` (int64) for word dropout: 0 for NULL and UNK, and ROOT
        once per train sentence, so that dropout leaves it alone."""
        counts = [0, 0, self.n_sentences, *(self.word_count_by_item[w] for w in self.words.itos[3:])]
        return torch.tensor(counts, dtype=torch.long)

    def state_dict(self) -> dict:
        """Everything needed to rebuild the vocabularies (stored in checkpoints)."""
        return {
            "words": dict(self.word_count_by_item),
            "tags": self.tags.itos[3:],
            "labels": list(self.system.labels),
            "tagset": self.tagset.value,
            "n_sentences": self.n_sentences,
            "word_min_count": self.word_min_count,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> ParserVocab:
        return cls(Counter(state["words"]), state["tags"], state["labels"], TagSet(state["tagset"]),
                   state["n_sentences"], state["word_min_count"])


def positions(config: Configuration, out: list[int]) -> None:
    """Append the 18 feature positions of ``config`` (word indices, ROOT = 0, ``-1`` = NULL) to ``out``.

    This is the only per-configuration Python work of feature extraction, hence the unrolled code.
    """
    stack, left, right = config.stack, config.left, config.right
    depth = len(stack)
    s1 = stack[-1]  # ROOT never leaves the stack, so it is never empty
    s2 = stack[-2] if depth > 1 else -1
    s3 = stack[-3] if depth > 2 else -1
    b1, n = config.next, config.n
    out += (s1, s2, s3, b1 if b1 <= n else -1, b1 + 1 if b1 < n else -1, b1 + 2 if b1 + 1 < n else -1)
    for head in (s1, s2):
        if head < 0:
            out += (-1, -1, -1, -1, -1, -1)
            continue
        lefts, rights = left[head], right[head]
        if lefts:
            lc1 = lefts[0]
            lc2 = lefts[1] if len(lefts) > 1 else -1
            lc1lc1 = left[lc1][0] if left[lc1] else -1
        else:
            lc1 = lc2 = lc1lc1 = -1
        if rights:
            rc1 = rights[-1]
            rc2 = rights[-2] if len(rights) > 1 else -1
            rc1rc1 = right[rc1][-1] if right[rc1] else -1
        else:
            rc1 = rc2 = rc1rc1 = -1
        out += (lc1, rc1, lc2, rc2, lc1lc1, rc1rc1)


class FeatureTable:
    """Ids of many sentences in flat arrays, to turn positions into feature vectors with one gather.

    Entry 0 of each array is NULL; sentence ``k`` occupies ``bases[k] + 0..n`` (ROOT first). ``labels``
    holds label ids of attached words: fill it with gold labels up front (training) or set entries as
    arcs are made (:meth:`set_label`, decoding); the features only read attached children.
    """

    def __init__(self, sentences: Sequence[SentenceIds]) -> None:
        lengths = np.array([len(s.words) for s in sentences], dtype=np.int64)
        self.bases = 1 + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        null = np.array([NULL_ID], dtype=np.int64)
        self.words = np.concatenate([null, *(s.words for s in sentences)])
        self.tags = np.concatenate([null, *(s.tags for s in sentences)])
        self.labels = np.full_like(self.words, NULL_ID)

    def set_label(self, sentence: int, word: int, label: int) -> None:
        """Record label index ``label`` for word ``word`` of sentence ``sentence``."""
        self.labels[self.bases[sentence] + word] = LABEL_OFFSET + label

    def features(self, flat_positions: Sequence[int], sentence_of_row: np.ndarray) -> np.ndarray:
        """Feature ids ``[m, 48]`` of ``m`` configurations from their :func:`positions` (``m * 18``,
        concatenated) and the sentence of each configuration ``[m]``."""
        local = np.asarray(flat_positions, dtype=np.int64).reshape(-1, N_WORD_FEATURES)
        where = np.where(local >= 0, local + self.bases[sentence_of_row][:, None], 0)  # NULL -> entry 0
        return np.concatenate([self.words[where], self.tags[where], self.labels[where[:, 6:]]], axis=1)


def extract_features(config: Configuration, ids: SentenceIds) -> np.ndarray:
    """The 48 feature ids ``[48]`` (int64) of one configuration of the sentence with ids ``ids``."""
    table = FeatureTable([ids])
    for word in range(1, config.n + 1):
        if config.labels[word] >= 0:
            table.set_label(0, word, config.labels[word])
    flat: list[int] = []
    positions(config, flat)
    return table.features(flat, np.zeros(1, dtype=np.int64))[0]


class TrainingExamples(NamedTuple):
    """Oracle configurations: ``features`` ``[T, 48]`` and gold ``transitions`` ``[T]`` (int64), and
    the number of sentences left out because their trees are not projective."""

    features: Tensor
    transitions: Tensor
    non_projective: int


def training_examples(sentences: Iterable[Sentence], vocab: ParserVocab) -> TrainingExamples:
    """Every configuration the static oracle passes through on the projective trees of ``sentences``.

    Each sentence must have a tree (:func:`check_tree`) with labels seen in train. Non-projective
    trees, which arc-standard cannot build, are skipped and counted.
    """
    system = vocab.system
    kept: list[SentenceIds] = []
    kept_labels: list[list[int]] = []
    flat: list[int] = []
    transitions: list[int] = []
    non_projective = 0
    for sentence in sentences:
        check_tree(sentence)
        if not is_projective(sentence.heads):
            non_projective += 1
            continue
        labels = vocab.label_indices(sentence)
        gold_heads, gold_labels, n_children = oracle_arrays(sentence.heads, labels)
        config = Configuration(len(sentence.words))
        while not config.is_final:
            positions(config, flat)
            transition = system.oracle(config, gold_heads, gold_labels, n_children)
            system.apply(config, transition)
            transitions.append(transition)
        kept.append(vocab.encode(sentence))
        kept_labels.append(labels)
    if not kept:
        return TrainingExamples(torch.zeros(0, N_FEATURES, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                non_projective)
    table = FeatureTable(kept)
    for k, labels in enumerate(kept_labels):
        start = table.bases[k] + 1  # word 1 of sentence k
        table.labels[start : start + len(labels)] = np.asarray(labels, dtype=np.int64) + LABEL_OFFSET
    # every sentence of n words takes exactly 2n transitions
    sentence_of_row = np.repeat(np.arange(len(kept), dtype=np.int64), [2 * (len(ids.words) - 1) for ids in kept])
    features = table.features(flat, sentence_of_row)
    return TrainingExamples(torch.from_numpy(features), torch.tensor(transitions, dtype=torch.long), non_projective)

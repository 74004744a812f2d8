"""Unlabelled and labelled attachment scores (UAS, LAS) in the two conventions parsers are reported in.

- CoNLL 2018 shared task (the UD convention): every syntactic word counts; LAS compares the universal
  part of DEPREL only (``nsubj:pass`` counts as ``nsubj``), as the task's official scorer does. With
  gold tokenisation its words align one to one.
- PTB style (Chen & Manning and the meProp/meSimp papers): punctuation does not count; LAS compares the
  full DEPREL. Punctuation is a word whose gold UPOS is ``PUNCT``: every UD treebank has UPOS, while
  XPOS may be absent. On English EWT these are the words with the Penn Treebank punctuation tags
  (``,`` ``.`` ``:`` ``-LRB-`` ``-RRB-`` and the two quote tags) plus ``HYPH`` and ``NFP``; ``#`` and
  ``$`` are ``SYM`` in UD and count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mesimp_gpu.data.conllu import Sentence, check_tree

PUNCT = "PUNCT"


@dataclass(frozen=True)
class AttachmentScores:
    """Counts over ``words`` scored words, and UAS/LAS in percent (0 when no word counts)."""

    words: int
    correct_heads: int
    correct_labelled: int  # right head and right label
    uas: float
    las: float

    @classmethod
    def from_counts(cls, words: int, correct_heads: int, correct_labelled: int) -> AttachmentScores:
        def percent(count: int) -> float:
            return 100.0 * count / words if words else 0.0

        return cls(words, correct_heads, correct_labelled, percent(correct_heads), percent(correct_labelled))


@dataclass(frozen=True)
class ParseScores:
    """Both conventions side by side: ``conll18`` all words, subtypes dropped for LAS; ``ptb`` without
    punctuation, full labels."""

    conll18: AttachmentScores
    ptb: AttachmentScores

    def headline(self) -> dict[str, float]:
        """The four numbers results report: UAS/LAS over all words and without punctuation."""
        return {"uas": self.conll18.uas, "las": self.conll18.las, "uas_no_punct": self.ptb.uas,
                "las_no_punct": self.ptb.las}


def universal_relation(deprel: str) -> str:
    """The universal part of a UD relation: ``nsubj:pass`` -> ``nsubj``."""
    return deprel.split(":", 1)[0]


def attachment_scores(
    gold: Sequence[Sentence], predicted: Sequence[tuple[Sequence[int], Sequence[str]]]
) -> ParseScores:
    """UAS and LAS of ``predicted`` ``(heads, deprels)`` per sentence against the trees of ``gold``.

    ``heads[i]`` is the predicted head of word ``i + 1`` (0 = ROOT). Every gold sentence must have a
    tree (:func:`check_tree`) and its prediction one entry per word.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predictions")
    all_words = all_heads = all_labelled = 0
    ptb_words = ptb_heads = ptb_labelled = 0
    for sentence, (heads, deprels) in zip(gold, predicted):
        check_tree(sentence)
        n = len(sentence.words)
        if len(heads) != n or len(deprels) != n:
            raise ValueError(f"{sentence.source}: prediction has {len(heads)} heads and {len(deprels)} labels "
                             f"for {n} words")
        for gold_head, gold_rel, upos, head, rel in zip(sentence.heads, sentence.deprels, sentence.upos,
                                                        heads, deprels):
            head_right = head == gold_head
            all_words += 1
            all_heads += head_right
            all_labelled += head_right and universal_relation(rel) == universal_relation(gold_rel)
            if upos != PUNCT:
                ptb_words += 1
                ptb_heads += head_right
                ptb_labelled += head_right and rel == gold_rel
    return ParseScores(
        AttachmentScores.from_counts(all_words, all_heads, all_labelled),
        AttachmentScores.from_counts(ptb_words, ptb_heads, ptb_labelled),
    )

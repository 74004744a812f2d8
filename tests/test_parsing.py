"""The arc-standard parser core: oracle, legality, features, batched greedy decoding and scores."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mesimp_gpu.data.conllu import Sentence, TagSet, check_tree, read_conllu
from mesimp_gpu.parsing.decode import parse_sentences
from mesimp_gpu.parsing.features import (
    FEATURE_NAMES,
    N_FEATURES,
    NULL,
    NULL_ID,
    ROOT,
    ROOT_ID,
    UNK_ID,
    ParserVocab,
    extract_features,
    training_examples,
)
from mesimp_gpu.parsing.scoring import attachment_scores
from mesimp_gpu.parsing.transitions import SHIFT, ArcStandard, Configuration, gold_transitions, is_projective


def sentence(
    words: str, heads: tuple[int, ...], deprels: str, tags: str | None = None, upos: str | None = None
) -> Sentence:
    """A sentence from space-separated words, labels and tags (XPOS; UPOS defaults to the same)."""
    word_list = tuple(words.split())
    tag_list = tuple(tags.split()) if tags else ("X",) * len(word_list)
    upos_list = tuple(upos.split()) if upos else tag_list
    return Sentence(word_list, upos_list, tag_list, "hand:1", heads, tuple(deprels.split()))


def crosses(heads: tuple[int, ...]) -> bool:
    """Whether two arcs cross (ROOT at position 0): the definition that :func:`is_projective` shortcuts."""
    arcs = [tuple(sorted((h, d))) for d, h in enumerate(heads, start=1)]
    return any(a < c < b < d for (a, b), (c, d) in itertools.permutations(arcs, 2))


def random_tree(n: int, rng: random.Random) -> tuple[int, ...]:
    """A random single-rooted tree on words 1..n (often non-projective)."""
    order = list(range(1, n + 1))
    rng.shuffle(order)
    heads = [0] * (n + 1)
    for k, word in enumerate(order[1:], start=1):
        heads[word] = order[rng.randrange(k)]  # a word placed earlier, so no cycle
    return tuple(heads[1:])


# --- transitions and oracle ------------------------------------------------------------------------------


def test_oracle_sequence_of_hand_made_trees() -> None:
    system = ArcStandard(["nsubj", "obj", "root"])
    L, R = system.left_arc, system.right_arc
    # He ate fish: ate is the root
    assert gold_transitions(system, (2, 0, 2), [0, 2, 1]) == [SHIFT, SHIFT, L(0), SHIFT, R(1), R(2)]
    # a chain 1 <- 0, 2 <- 1, 3 <- 2: word 2 must not leave the stack before its child 3 is attached
    assert gold_transitions(system, (0, 1, 2), [2, 1, 1]) == [SHIFT, SHIFT, SHIFT, R(1), R(1), R(2)]
    assert gold_transitions(system, (0,), [2]) == [SHIFT, R(2)]
    assert [system.name(t) for t in (0, 1, 3, 4, 6)] == [
        "SHIFT", "LEFT-ARC(nsubj)", "LEFT-ARC(root)", "RIGHT-ARC(nsubj)", "RIGHT-ARC(root)"]
    with pytest.raises(ValueError, match="not projective"):
        gold_transitions(system, (3, 4, 0, 3), [0, 0, 2, 0])  # arcs 3->1 and 4->2 cross


def test_children_lists_stay_sorted() -> None:
    system = ArcStandard(["dep"])
    config = Configuration(5)
    # 1 2 3 <- 4 -> 5, with 1 and 2 also on 4: left children are attached nearest first
    for t in [SHIFT, SHIFT, SHIFT, SHIFT, system.left_arc(0), system.left_arc(0), system.left_arc(0), SHIFT,
              system.right_arc(0), system.right_arc(0)]:
        system.apply(config, t)
    assert config.left[4] == [1, 2, 3] and config.right[4] == [5] and config.right[0] == [4]
    assert config.is_final and config.heads[1:] == [4, 4, 4, 0, 4]


@pytest.mark.parametrize("n", range(1, 9))
def test_is_projective_agrees_with_crossing_arcs(n: int) -> None:
    rng = random.Random(n)
    for _ in range(200):
        heads = random_tree(n, rng)
        assert is_projective(heads) == (not crosses(heads)), heads
    with pytest.raises(ValueError, match="cycle"):
        is_projective((0, 3, 2))


def test_oracle_rebuilds_every_projective_dev_tree(ud_dir: Path) -> None:
    dev = read_conllu(ud_dir / "en_ewt-ud-dev.conllu.gz", require_trees=True)
    system = ArcStandard(sorted({d for s in dev for d in s.deprels}))
    rebuilt = non_projective = 0
    for s in dev:
        if not is_projective(s.heads):
            assert crosses(s.heads)
            non_projective += 1
            continue
        labels = [system.label_index[d] for d in s.deprels]
        sequence = gold_transitions(system, s.heads, labels)
        config = Configuration(len(s.words))
        for t in sequence:
            assert system.legal_mask(config)[t]
            system.apply(config, t)
        assert len(sequence) == 2 * len(s.words) and config.is_final
        assert tuple(config.heads[1:]) == s.heads
        assert tuple(system.labels[label] for label in config.labels[1:]) == s.deprels
        rebuilt += 1
    assert (rebuilt, non_projective) == (1970, 31)


# --- legality --------------------------------------------------------------------------------------------


def test_legal_masks_and_root_rules() -> None:
    system = ArcStandard(["a", "b"])  # outputs: SHIFT, LEFT(a), LEFT(b), RIGHT(a), RIGHT(b)
    config = Configuration(2)
    expected = [
        [1, 0, 0, 0, 0],  # stack [ROOT], buffer 1 2: only SHIFT
        [1, 0, 0, 0, 0],  # [ROOT, 1]: no LEFT-ARC onto ROOT, no RIGHT-ARC to ROOT while the buffer has 2
        [0, 1, 1, 1, 1],  # [ROOT, 1, 2], buffer empty: LEFT or RIGHT
    ]
    for row, t in zip(expected, [SHIFT, SHIFT, system.right_arc(1)]):
        assert system.legal_mask(config).tolist() == [bool(x) for x in row]
        system.apply(config, t)
    # [ROOT, 1] with an empty buffer: only RIGHT-ARC, attaching 1 to ROOT
    assert system.legal_mask(config).tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="SHIFT"):
        system.apply(config, SHIFT)
    with pytest.raises(ValueError, match="LEFT-ARC"):
        system.apply(config, system.left_arc(0))
    system.apply(config, system.right_arc(0))
    assert config.is_final and not system.legal_mask(config).any()
    assert config.heads[1:] == [0, 1] and config.labels[1:] == [0, 1]
    with pytest.raises(ValueError, match="outside"):
        system.apply(Configuration(1), 5)
    masks = system.legal_masks([Configuration(1), config])
    assert masks.shape == (2, 5) and masks.dtype == torch.bool


# --- features --------------------------------------------------------------------------------------------

# 15 words; the tree is only needed to build the vocabularies
HAND_WORDS = "The wb wc wd we wf wg wh wi wj wk wl wm 2024 wo"  # word k is w + the k-th letter
HAND_TAGS = " ".join(f"T{k}" for k in range(1, 16))
HAND_HEADS = (3, 3, 5, 5, 0, 5, 5, 10, 10, 5, 10, 11, 11, 10, 5)
HAND_LABELS = " ".join("root" if k == 5 else f"l{k}" for k in range(1, 16))


def test_features_of_a_hand_checked_configuration() -> None:
    s = sentence(HAND_WORDS, HAND_HEADS, HAND_LABELS, HAND_TAGS)
    vocab = ParserVocab.build([s], TagSet.XPOS)
    system = vocab.system
    assert vocab.words.itos[:3] == [NULL, "<unk>", ROOT] and (NULL_ID, UNK_ID, ROOT_ID) == (0, 1, 2)
    assert vocab.words.itos[3:6] == ["0000", "the", "wb"]  # all seen once: alphabetical
    lab = system.label_index
    LA, RA = (lambda w: system.left_arc(lab[f"l{w}"])), (lambda w: system.right_arc(lab[f"l{w}"]))
    # stack [ROOT, 5, 10], buffer 14 15. Word 5 has left children 3 4 (3 has left children 1 2) and right
    # children 6 7; word 10 has left children 8 9 and right child 11, which has right children 12 13
    config = Configuration(15)
    for t in [SHIFT, SHIFT, SHIFT, LA(2), LA(1), SHIFT, SHIFT, LA(4), LA(3), SHIFT, RA(6), SHIFT, RA(7),
              SHIFT, SHIFT, SHIFT, LA(9), LA(8), SHIFT, SHIFT, RA(12), SHIFT, RA(13), RA(11)]:
        system.apply(config, t)
    assert config.stack == [0, 5, 10] and config.next == 14
    # s1 s2 s3 b1 b2 b3, then lc1 rc1 lc2 rc2 lc1(lc1) rc1(rc1) of s1 (10), then of s2 (5);
    # words normalised: word 1 "The" is "the", word 14 "2024" is "0000"
    words = ["wj", "we", ROOT, "0000", "wo", NULL,
             "wh", "wk", "wi", NULL, NULL, "wm",
             "wc", "wg", "wd", "wf", "the", NULL]
    tags = ["T10", "T5", ROOT, "T14", "T15", NULL,
            "T8", "T11", "T9", NULL, NULL, "T13",
            "T3", "T7", "T4", "T6", "T1", NULL]
    labels = ["l8", "l11", "l9", NULL, NULL, "l13",
              "l3", "l7", "l4", "l6", "l1", NULL]
    expected = ([vocab.words.itos.index(w) for w in words] + [vocab.tags.itos.index(t) for t in tags]
                + [vocab.labels.itos.index(x) for x in labels])
    features = extract_features(config, vocab.encode(s))
    assert features.dtype == np.int64 and features.shape == (N_FEATURES,)
    assert features.tolist() == expected
    assert len(FEATURE_NAMES) == 48 and FEATURE_NAMES[0] == "s1.word" and FEATURE_NAMES[-1] == "rc1.rc1.s2.label"
    assert [vocab.labels.itos[i] for i in features[36:]] == labels
    unknown = sentence("Zebra WB", (0, 1), "root l2", "T1 NEW")
    assert vocab.encode(unknown).words.tolist() == [ROOT_ID, UNK_ID, vocab.words.index("wb")]
    assert vocab.encode(unknown).tags.tolist() == [ROOT_ID, vocab.tags.index("T1"), UNK_ID]


def test_stack_and_buffer_features_at_their_ends() -> None:
    s = sentence("The wb wc", (0, 1, 1), "root l2 l3")
    vocab = ParserVocab.build([s])
    ids = vocab.encode(s)
    config = Configuration(3)
    seen = []
    for _ in range(4):
        seen.append([vocab.words.itos[i] for i in extract_features(config, ids)[:6]])
        if not config.next > config.n:
            vocab.system.apply(config, SHIFT)
    assert seen == [
        [ROOT, NULL, NULL, "the", "wb", "wc"],
        ["the", ROOT, NULL, "wb", "wc", NULL],
        ["wb", "the", ROOT, "wc", NULL, NULL],
        ["wc", "wb", "the", NULL, NULL, NULL],
    ]


def test_training_examples_match_single_extraction_and_skip_non_projective() -> None:
    projective = sentence(HAND_WORDS, HAND_HEADS, HAND_LABELS, HAND_TAGS)
    crossing = sentence("a b c d", (3, 4, 0, 3), "l1 l2 root l3")
    other = sentence("He ate fish", (2, 0, 2), "l1 root l2")
    vocab = ParserVocab.build([projective, crossing, other])
    examples = training_examples([projective, crossing, other], vocab)
    assert examples.non_projective == 1
    assert examples.features.shape == (2 * 18, 48) and examples.transitions.shape == (36,)
    assert examples.features.dtype == torch.long and examples.transitions.dtype == torch.long
    row = 0
    for s in (projective, other):
        config = Configuration(len(s.words))
        labels = vocab.label_indices(s)
        for t in gold_transitions(vocab.system, s.heads, labels):
            assert examples.features[row].tolist() == extract_features(config, vocab.encode(s)).tolist()
            assert examples.transitions[row] == t
            vocab.system.apply(config, t)
            row += 1
    assert training_examples([crossing], vocab).features.shape == (0, 48)
    with pytest.raises(ValueError, match="not seen in train"):
        training_examples([sentence("a", (0,), "new")], vocab)


def test_vocab_state_dict_and_word_counts() -> None:
    train = [sentence("the cat the", (2, 0, 2), "det root det"), sentence("cat", (0,), "root")]
    vocab = ParserVocab.build(train)
    assert vocab.words.itos == [NULL, "<unk>", ROOT, "cat", "the"]  # by count, then alphabetically
    assert vocab.word_counts().tolist() == [0, 0, 2, 2, 2]  # ROOT once per sentence
    rebuilt = ParserVocab.from_state_dict(vocab.state_dict())
    assert rebuilt.words.itos == vocab.words.itos and rebuilt.tags.itos == vocab.tags.itos
    assert rebuilt.system.labels == vocab.system.labels == ("det", "root") and rebuilt.tagset is TagSet.XPOS
    with pytest.raises(ValueError, match="no UPOS tags"):
        ParserVocab.build([sentence("a", (0,), "root", "X", "_")], TagSet.UPOS)


# --- decoding --------------------------------------------------------------------------------------------


def assert_trees(sentences: list[Sentence], parses: list, system: ArcStandard) -> None:
    """Each parse is a single-rooted tree over every word, with labels from the system: projective too."""
    assert len(parses) == len(sentences)
    for s, (heads, deprels) in zip(sentences, parses):
        assert len(heads) == len(deprels) == len(s.words)
        check_tree(Sentence(s.words, s.upos, s.xpos, s.source, heads, deprels))
        assert heads.count(0) == 1 and is_projective(heads) and set(deprels) <= set(system.labels)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_decoding_with_a_random_scorer_gives_trees(seed: int, batch_size: int) -> None:
    rng = random.Random(seed)
    train = [sentence(HAND_WORDS, HAND_HEADS, HAND_LABELS, HAND_TAGS)]
    vocab = ParserVocab.build(train)
    sentences = []
    for n in [1, 2, 5, 1, 13, 30, 7, 3]:
        words = " ".join(rng.choice(["wb", "wc", "The", "zebra"]) for _ in range(n))
        sentences.append(sentence(words, (), "", " ".join(rng.choice(["T1", "T5", "NEW"]) for _ in range(n))))
    generator = torch.Generator().manual_seed(seed)
    calls = []

    def score(features: torch.Tensor) -> torch.Tensor:
        assert features.dtype == torch.long and features.shape[1] == 48
        calls.append(features.shape[0])
        # large scores so that illegal transitions often win unless masked
        return torch.randn(features.shape[0], vocab.system.n_outputs, generator=generator) * 1e3

    parses = parse_sentences(sentences, vocab, score, batch_size=batch_size)
    assert_trees(sentences, parses, vocab.system)
    assert sum(calls) == sum(2 * len(s.words) for s in sentences)  # one row per transition
    if batch_size >= len(sentences):
        assert len(calls) == 2 * 30  # the longest sentence's steps, all sentences at once


def test_decoding_follows_the_scores(ud_dir: Path) -> None:
    """A scorer that knows each oracle configuration's transition from its features gives back the gold
    trees: the decoder's features, built step by step, are those of training."""
    dev = read_conllu(ud_dir / "en_ewt-ud-dev.conllu.gz", limit=300)
    vocab = ParserVocab.build(dev)
    projective = [s for s in dev if is_projective(s.heads)]
    examples = training_examples(projective, vocab)
    table: dict[tuple[int, ...], int] = {}
    for row, t in zip(examples.features.tolist(), examples.transitions.tolist()):
        assert table.setdefault(tuple(row), t) == t, "two oracle configurations share features"

    def score(features: torch.Tensor) -> torch.Tensor:
        best = torch.tensor([table[tuple(row)] for row in features.tolist()])
        return torch.nn.functional.one_hot(best, vocab.system.n_outputs).float()

    parses = parse_sentences(projective, vocab, score, batch_size=50)
    assert parses == [(s.heads, s.deprels) for s in projective]


def test_decoding_random_scorer_on_dev(ud_dir: Path, seed: int) -> None:
    dev = read_conllu(ud_dir / "en_ewt-ud-dev.conllu.gz")
    vocab = ParserVocab.build(dev)
    generator = torch.Generator().manual_seed(seed)
    parses = parse_sentences(dev, vocab, lambda f: torch.randn(f.shape[0], vocab.system.n_outputs, generator=generator))
    assert_trees(dev, parses, vocab.system)


def test_decoding_rejects_a_badly_shaped_scorer() -> None:
    vocab = ParserVocab.build([sentence("a b", (0, 1), "root dep")])
    with pytest.raises(ValueError, match="expected"):
        parse_sentences([sentence("a", (), "")], vocab, lambda f: torch.zeros(f.shape[0], 3))


# --- scoring ---------------------------------------------------------------------------------------------


def test_attachment_scores_in_both_conventions() -> None:
    gold = [
        sentence("She was seen there .", (3, 3, 0, 3, 3), "nsubj:pass aux:pass root advmod punct",
                 upos="PRON AUX VERB ADV PUNCT"),
        sentence("Hi !", (0, 1), "root punct", upos="INTJ PUNCT"),
    ]
    predicted = [
        # right head, subtype missing; right; right; wrong head, right label; punctuation, wrong head
        ((3, 3, 0, 2, 4), ("nsubj", "aux:pass", "root", "advmod", "punct")),
        # right head, wrong label; punctuation right
        ((0, 1), ("discourse", "punct")),
    ]
    scores = attachment_scores(gold, predicted)
    # CoNLL 2018: 7 words; heads right: 1 2 3 | 1 2 = 5; with universal label: 1 2 3 | 2 = 4
    assert (scores.conll18.words, scores.conll18.correct_heads, scores.conll18.correct_labelled) == (7, 5, 4)
    assert scores.conll18.uas == pytest.approx(500 / 7) and scores.conll18.las == pytest.approx(400 / 7)
    # PTB: the 2 punctuation words out, 5 words; heads right: 1 2 3 | 1 = 4; with full label: 2 3 = 2
    assert (scores.ptb.words, scores.ptb.correct_heads, scores.ptb.correct_labelled) == (5, 4, 2)
    assert scores.ptb.uas == pytest.approx(80.0) and scores.ptb.las == pytest.approx(40.0)
    with pytest.raises(ValueError, match="2 gold sentences but 1"):
        attachment_scores(gold, predicted[:1])
    with pytest.raises(ValueError, match="hand:1: prediction has 1 heads"):
        attachment_scores(gold[1:], [((0,), ("root",))])

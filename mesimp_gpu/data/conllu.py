"""CoNLL-U treebanks for POS tagging: a strict reader, vocabularies from train, word-shape features.

Reader: plain or gzip (detected from the file's first bytes, not its name). Comment lines (``#``) are
skipped, a blank line ends a sentence, multi-word token ranges (``3-4``) and empty nodes (``5.1``) are
skipped. Anything else that is not a 10-column token line with the next integer ID is an error
(:class:`ConlluFormatError`) naming the file and line.

Tags: ``XPOS`` (Penn Treebank in English treebanks, the paper's tag set) or ``UPOS``.

Unknown words: the word vocabulary holds normalised train words (lower case, digits as ``0``); other
words map to ``UNK``. In training, :func:`word_dropout` replaces a word of train count ``c`` by ``UNK``
with probability ``alpha / (alpha + c)``, so the ``UNK`` embedding is trained on rare words. Each token
also gets :data:`SHAPE_FEATURES` (capitalisation, digits, hyphen, 2- and 3-letter prefixes and
suffixes), which carry most of the information about a word the vocabulary does not know.
"""

from __future__ import annotations

import enum
import gzip
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
#: label for padded positions; ``cross_entropy``'s default ``ignore_index``
IGNORE_TAG = -100
COLUMNS = 10
_GZIP_MAGIC = b"\x1f\x8b"
_INT_ID = re.compile(r"[1-9][0-9]*")
_RANGE_ID = re.compile(r"[1-9][0-9]*-[1-9][0-9]*")
_EMPTY_ID = re.compile(r"[0-9]+\.[1-9][0-9]*")
_DIGIT = re.compile(r"[0-9]")


class TagSet(str, enum.Enum):
    """Which CoNLL-U column supplies the tags."""

    XPOS = "xpos"  # language-specific; Penn Treebank tags in English treebanks
    UPOS = "upos"  # Universal POS tags


class ConlluFormatError(ValueError):
    """A line of a CoNLL-U file does not follow the format; the message names the file and line."""


@dataclass(frozen=True)
class Sentence:
    """One sentence's syntactic words (multi-word tokens and empty nodes removed).

    ``source`` is ``file:line`` of the sentence's first token line, for error messages.
    """

    words: tuple[str, ...]
    upos: tuple[str, ...]
    xpos: tuple[str, ...]
    source: str

    def tags(self, tagset: TagSet) -> tuple[str, ...]:
        """The tag column chosen by ``tagset``."""
        return self.xpos if tagset is TagSet.XPOS else self.upos


def _open_text(path: Path):
    """Open ``path`` as UTF-8 text, gunzipping when the file starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_conllu(path: str | Path) -> Iterator[Sentence]:
    """Yield the sentences of the CoNLL-U file ``path`` (plain or gzip), checking every line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CoNLL-U file not found: {path}")
    words: list[str] = []
    upos: list[str] = []
    xpos: list[str] = []
    start = 0
    with _open_text(path) as f:
        try:
            for number, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                where = f"{path}:{number}"
                if not line.strip():
                    if words:
                        yield Sentence(tuple(words), tuple(upos), tuple(xpos), f"{path}:{start}")
                        words, upos, xpos = [], [], []
                    continue
                if line.startswith("#"):
                    if words:
                        raise ConlluFormatError(f"{where}: comment line inside a sentence; a blank line must end it")
                    continue
                fields = line.split("\t")
                if len(fields) != COLUMNS:
                    raise ConlluFormatError(
                        f"{where}: expected {COLUMNS} tab-separated columns, found {len(fields)} "
                        "(is the file CoNLL-U, with tabs rather than spaces?)"
                    )
                token_id = fields[0]
                if _RANGE_ID.fullmatch(token_id) or _EMPTY_ID.fullmatch(token_id):
                    continue
                if not _INT_ID.fullmatch(token_id):
                    raise ConlluFormatError(
                        f"{where}: token ID {token_id!r} is not an integer, a range or an empty node"
                    )
                if int(token_id) != len(words) + 1:
                    raise ConlluFormatError(f"{where}: token ID {token_id} out of order, expected {len(words) + 1}")
                if not fields[1]:
                    raise ConlluFormatError(f"{where}: empty FORM column")
                if not words:
                    start = number
                words.append(fields[1])
                upos.append(fields[3])
                xpos.append(fields[4])
        except UnicodeDecodeError as exc:
            raise ConlluFormatError(f"{path}: not UTF-8 text ({exc.reason}); CoNLL-U files are UTF-8") from exc
    if words:  # the last sentence may lack its closing blank line
        yield Sentence(tuple(words), tuple(upos), tuple(xpos), f"{path}:{start}")


def read_conllu(path: str | Path, limit: int | None = None) -> list[Sentence]:
    """The first ``limit`` sentences (all when None) of the CoNLL-U file ``path``."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    sentences = []
    for sentence in iter_conllu(path):
        sentences.append(sentence)
        if limit is not None and len(sentences) >= limit:
            break
    return sentences


def normalise_word(word: str) -> str:
    """The key of a word in the vocabulary: lower case, every digit as ``0``."""
    return _DIGIT.sub("0", word.lower())


def capitalisation(word: str) -> str:
    """Capitalisation class of ``word``."""
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return "none"
    if all(c.isupper() for c in letters):
        return "upper"
    if letters[0].isupper() and word[0].isalpha():
        return "title"
    if any(c.isupper() for c in letters):
        return "mixed"
    return "lower"


def digits(word: str) -> str:
    """Digit class of ``word``: none, all digits (punctuation such as ``1,000.5`` allowed), or some."""
    count = sum(c.isdigit() for c in word)
    if count == 0:
        return "none"
    return "number" if all(c.isdigit() or c in ",.-/:" for c in word) else "some"


#: name -> function of the raw word; one embedding table per feature
SHAPE_FEATURES = {
    "cap": capitalisation,
    "digit": digits,
    "hyphen": lambda w: "yes" if "-" in w else "no",
    "prefix2": lambda w: w.lower()[:2],
    "prefix3": lambda w: w.lower()[:3],
    "suffix2": lambda w: w.lower()[-2:],
    "suffix3": lambda w: w.lower()[-3:],
}


class Vocab:
    """String <-> id with ``<pad>`` = 0 and ``<unk>`` = 1; ``counts`` are the train frequencies."""

    def __init__(self, counts: Counter[str], min_count: int = 1) -> None:
        kept = sorted((s for s, c in counts.items() if c >= min_count), key=lambda s: (-counts[s], s))
        self.itos: list[str] = [PAD, UNK, *kept]
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        self.counts = Counter({s: counts[s] for s in kept})

    def __len__(self) -> int:
        return len(self.itos)

    def index(self, item: str) -> int:
        """Id of ``item``, ``UNK_ID`` when unknown."""
        return self.stoi.get(item, UNK_ID)

    def state_dict(self) -> dict[str, int]:
        """Counts, enough to rebuild the vocabulary (checkpoints)."""
        return dict(self.counts)

    @classmethod
    def from_state_dict(cls, counts: dict[str, int]) -> Vocab:
        return cls(Counter(counts))


class TagVocab:
    """Tag <-> id, no padding entry. A tag unseen in train gets id ``len(self)``, which no output
    score can predict, so it counts as an error in evaluation (and must not reach a training loss)."""

    def __init__(self, tags: Iterable[str]) -> None:
        self.itos: list[str] = sorted(set(tags))
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def index(self, tag: str) -> int:
        """Id of ``tag``; ``len(self)`` when it was not seen in train."""
        return self.stoi.get(tag, len(self.itos))


@dataclass(frozen=True)
class EncodedSentence:
    """Ids of one sentence: ``words`` ``[T]``, ``features`` ``[T, F]``, ``tags`` ``[T]`` (int64)."""

    words: Tensor
    features: Tensor
    tags: Tensor


class TaggingVocab:
    """Word, shape-feature and tag vocabularies built from the training sentences."""

    def __init__(self, words: Vocab, features: dict[str, Vocab], tags: TagVocab, tagset: TagSet) -> None:
        self.words, self.features, self.tags, self.tagset = words, features, tags, tagset

    @classmethod
    def build(cls, train: Sequence[Sentence], tagset: TagSet, affix_min_count: int = 2) -> TaggingVocab:
        """Vocabularies from ``train``; affixes rarer than ``affix_min_count`` map to UNK (too rare to learn)."""
        if not train:
            raise ValueError("cannot build vocabularies from an empty training set")
        for sentence in train:
            if "_" in sentence.tags(tagset):
                raise ValueError(
                    f"{sentence.source}: sentence has no {tagset.value.upper()} tags ('_'); "
                    f"choose the other tag set (--tagset {'upos' if tagset is TagSet.XPOS else 'xpos'})"
                )
        tokens = [w for s in train for w in s.words]
        words = Vocab(Counter(normalise_word(w) for w in tokens))
        closed = ("cap", "digit", "hyphen")  # small closed classes: every value is kept
        features = {
            name: Vocab(Counter(fn(w) for w in tokens), min_count=1 if name in closed else affix_min_count)
            for name, fn in SHAPE_FEATURES.items()
        }
        tags = TagVocab(t for s in train for t in s.tags(tagset))
        return cls(words, features, tags, tagset)

    def encode(self, sentence: Sentence) -> EncodedSentence:
        """Ids of ``sentence``; unknown words and affixes map to UNK, unseen tags to ``len(self.tags)``."""
        words = torch.tensor([self.words.index(normalise_word(w)) for w in sentence.words], dtype=torch.long)
        features = torch.tensor(
            [[self.features[name].index(fn(w)) for name, fn in SHAPE_FEATURES.items()] for w in sentence.words],
            dtype=torch.long,
        )
        tags = torch.tensor([self.tags.index(t) for t in sentence.tags(self.tagset)], dtype=torch.long)
        return EncodedSentence(words, features, tags)

    def state_dict(self) -> dict:
        """Everything needed to rebuild the vocabularies (stored in checkpoints)."""
        return {
            "words": self.words.state_dict(),
            "features": {name: v.state_dict() for name, v in self.features.items()},
            "tags": self.tags.itos,
            "tagset": self.tagset.value,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> TaggingVocab:
        features = {name: Vocab.from_state_dict(c) for name, c in state["features"].items()}
        return cls(Vocab.from_state_dict(state["words"]), features, TagVocab(state["tags"]), TagSet(state["tagset"]))


@dataclass(frozen=True)
class Batch:
    """Padded sentences: ``words`` ``[B, T]``, ``features`` ``[B, T, F]``, ``tags`` ``[B, T]``
    (:data:`IGNORE_TAG` at padding), ``lengths`` ``[B]``."""

    words: Tensor
    features: Tensor
    tags: Tensor
    lengths: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.words, self.features, self.tags, self.lengths)))


def make_batch(sentences: Sequence[EncodedSentence]) -> Batch:
    """Right-pad ``sentences`` into one :class:`Batch`."""
    if not sentences:
        raise ValueError("cannot batch zero sentences")
    lengths = torch.tensor([len(s.words) for s in sentences], dtype=torch.long)
    steps, n_features = int(lengths.max()), sentences[0].features.shape[1]
    words = torch.full((len(sentences), steps), PAD_ID, dtype=torch.long)
    features = torch.full((len(sentences), steps, n_features), PAD_ID, dtype=torch.long)
    tags = torch.full((len(sentences), steps), IGNORE_TAG, dtype=torch.long)
    for b, s in enumerate(sentences):
        n = len(s.words)
        words[b, :n], features[b, :n], tags[b, :n] = s.words, s.features, s.tags
    return Batch(words, features, tags, lengths)


def word_dropout(words: Tensor, counts: Tensor, alpha: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace word ids by ``UNK_ID`` with probability ``alpha / (alpha + count)``; padding stays.

    ``words`` any shape of ids, ``counts`` ``[V]`` train counts by id (0 for PAD/UNK).
    """
    if alpha <= 0:
        return words
    c = counts[words].to(torch.float32)
    drop = torch.rand(words.shape, generator=generator, device=words.device) < alpha / (alpha + c)
    return torch.where(drop & (words != PAD_ID), torch.full_like(words, UNK_ID), words)


def word_counts(vocab: Vocab) -> Tensor:
    """Train counts by word id ``[V]`` (int64), for :func:`word_dropout`."""
    return torch.tensor([vocab.counts.get(s, 0) for s in vocab.itos], dtype=torch.long)

"""CoNLL-U treebanks for POS tagging and parsing: a strict reader, a column rewriter, vocabularies from
train, word-shape features.

Reader: plain or gzip (detected from the file's first bytes, not its name). Comment lines (``#``) are
skipped, a blank line ends a sentence, multi-word token ranges (``3-4``) and empty nodes (``5.1``) are
skipped. Anything else that is not a 10-column token line with the next integer ID is an error
(:class:`ConlluFormatError`) naming the file and line.

Trees: the reader keeps HEAD and DEPREL of every word but does not require them to form a tree, so that
a tagger can read files whose trees are absent (HEAD ``_``) or broken. :func:`check_tree` (or the
reader's ``require_trees=True``) checks that they do: every HEAD an integer ``0..n``, exactly one word
on ROOT (HEAD 0), no cycle, no empty or ``_`` DEPREL.

Writing: :func:`rewrite_conllu` copies a CoNLL-U file with chosen columns of its words replaced (a
parser's HEAD and DEPREL, a tagger's XPOS or UPOS); every other byte is copied unchanged.

Tags: ``XPOS`` (Penn Treebank in English treebanks, the paper's tag set) or ``UPOS``.

Unknown words: the word vocabulary holds normalised train words (lower case, digits as ``0``); other
words map to ``UNK``. In training, :func:`word_dropout` replaces a word of train count ``c`` by ``UNK``
with probability ``alpha / (alpha + c)``, so the ``UNK`` embedding is trained on rare words. Each token
also gets :data:`SHAPE_FEATURES` (capitalisation, digits, hyphen, 2- and 3-letter prefixes and
suffixes), which carry most of the information about a word the vocabulary does not know, and its
characters (raw form, :func:`word_chars`) for a character-level word model; characters rarer than
twice in train map to the character ``UNK``, so that entry is trained and unseen characters are harmless.
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

from mesimp_gpu.io import write_bytes

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
#: label for padded positions; ``cross_entropy``'s default ``ignore_index``
IGNORE_TAG = -100
COLUMNS = 10
#: CoNLL-U column names in file order
COLUMN_NAMES = ("ID", "FORM", "LEMMA", "UPOS", "XPOS", "FEATS", "HEAD", "DEPREL", "DEPS", "MISC")
#: :attr:`Sentence.heads` entry of a HEAD that is not an integer (``_`` in files without trees)
NO_HEAD = -1
_GZIP_MAGIC = b"\x1f\x8b"
_INT_ID = re.compile(r"[1-9][0-9]*")
_RANGE_ID = re.compile(r"[1-9][0-9]*-[1-9][0-9]*")
_EMPTY_ID = re.compile(r"[0-9]+\.[1-9][0-9]*")
_HEAD = re.compile(r"0|[1-9][0-9]*")
_DIGIT = re.compile(r"[0-9]")
#: characters of a word given to a character model: longer words keep their first and last half of this
MAX_WORD_CHARS = 20


class TagSet(str, enum.Enum):
    """Which CoNLL-U column supplies the tags."""

    XPOS = "xpos"  # language-specific; Penn Treebank tags in English treebanks
    UPOS = "upos"  # Universal POS tags


class ConlluFormatError(ValueError):
    """A line of a CoNLL-U file does not follow the format; the message names the file and line."""


@dataclass(frozen=True)
class Sentence:
    """One sentence's syntactic words (multi-word tokens and empty nodes removed).

    ``source`` is ``file:line`` of the sentence's first token line, for error messages. ``heads[i]`` is
    the HEAD of word ``i + 1`` (0 = ROOT, :data:`NO_HEAD` when the column is not an integer) and
    ``deprels[i]`` its DEPREL; ``lines[i]`` is the line number of word ``i + 1`` in the file. The three
    are empty for sentences built by hand without a tree.
    """

    words: tuple[str, ...]
    upos: tuple[str, ...]
    xpos: tuple[str, ...]
    source: str
    heads: tuple[int, ...] = ()
    deprels: tuple[str, ...] = ()
    lines: tuple[int, ...] = ()

    def tags(self, tagset: TagSet) -> tuple[str, ...]:
        """The tag column chosen by ``tagset``."""
        return self.xpos if tagset is TagSet.XPOS else self.upos


def _open_text(path: Path, newline: str | None = None):
    """Open ``path`` as UTF-8 text, gunzipping when the file starts with the gzip magic bytes.

    ``newline`` as for :func:`open`; ``""`` keeps line endings as they are in the file.
    """
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    return open(path, encoding="utf-8", newline=newline)


def _head(field: str) -> int:
    """HEAD column as an integer, :data:`NO_HEAD` when it is not one."""
    return int(field) if _HEAD.fullmatch(field) else NO_HEAD


def iter_conllu(path: str | Path, require_trees: bool = False) -> Iterator[Sentence]:
    """Yield the sentences of the CoNLL-U file ``path`` (plain or gzip), checking every line.

    With ``require_trees``, every sentence must also pass :func:`check_tree`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CoNLL-U file not found: {path}")
    rows: list[tuple[str, str, str, int, str, int]] = []  # (FORM, UPOS, XPOS, HEAD, DEPREL, line) per word

    def sentence() -> Sentence:
        words, upos, xpos, heads, deprels, lines = (tuple(column) for column in zip(*rows))
        rows.clear()
        made = Sentence(words, upos, xpos, f"{path}:{lines[0]}", heads, deprels, lines)
        if require_trees:
            check_tree(made)
        return made

    with _open_text(path) as f:
        try:
            for number, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                where = f"{path}:{number}"
                if not line.strip():
                    if rows:
                        yield sentence()
                    continue
                if line.startswith("#"):
                    if rows:
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
                if int(token_id) != len(rows) + 1:
                    raise ConlluFormatError(f"{where}: token ID {token_id} out of order, expected {len(rows) + 1}")
                if not fields[1]:
                    raise ConlluFormatError(f"{where}: empty FORM column")
                rows.append((fields[1], fields[3], fields[4], _head(fields[6]), fields[7], number))
        except UnicodeDecodeError as exc:
            raise ConlluFormatError(f"{path}: not UTF-8 text ({exc.reason}); CoNLL-U files are UTF-8") from exc
    if rows:  # the last sentence may lack its closing blank line
        yield sentence()


def read_conllu(path: str | Path, limit: int | None = None, require_trees: bool = False) -> list[Sentence]:
    """The first ``limit`` sentences (all when None) of the CoNLL-U file ``path``.

    With ``require_trees``, every sentence read must pass :func:`check_tree`.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    sentences = []
    for sentence in iter_conllu(path, require_trees=require_trees):
        sentences.append(sentence)
        if limit is not None and len(sentences) >= limit:
            break
    return sentences


def _word_location(sentence: Sentence, word: int) -> str:
    """``file:line`` of word ``word`` (1-based), the sentence's own ``source`` when lines are unknown."""
    if len(sentence.lines) == len(sentence.words):
        return f"{sentence.source.rsplit(':', 1)[0]}:{sentence.lines[word - 1]}"
    return sentence.source


def check_tree(sentence: Sentence) -> None:
    """Raise :class:`ConlluFormatError` naming file and line unless HEAD and DEPREL form a tree.

    A tree: every HEAD an integer ``0..n`` (``n`` words), exactly one word with HEAD 0, every word
    reaches ROOT by following heads (no cycle), every DEPREL neither empty nor ``_``.
    """
    n = len(sentence.words)
    if len(sentence.heads) != n or len(sentence.deprels) != n:
        raise ConlluFormatError(f"{sentence.source}: sentence has no HEAD and DEPREL columns")
    roots = []
    for word, (head, deprel) in enumerate(zip(sentence.heads, sentence.deprels), start=1):
        where = _word_location(sentence, word)
        if head == NO_HEAD:
            raise ConlluFormatError(f"{where}: HEAD of word {word} is not an integer; a tree needs one")
        if not 0 <= head <= n:
            raise ConlluFormatError(f"{where}: HEAD {head} of word {word} is out of range 0..{n}")
        if deprel in ("", "_"):
            raise ConlluFormatError(f"{where}: DEPREL of word {word} is {deprel!r}; a tree needs a relation")
        if head == 0:
            roots.append(word)
            if len(roots) > 1:
                raise ConlluFormatError(
                    f"{where}: word {word} is a second root (HEAD 0) after word {roots[0]}; a tree has one"
                )
    if not roots:
        raise ConlluFormatError(f"{sentence.source}: no word has HEAD 0; a tree needs a root")
    # 0 = unvisited, 1 = on the path being followed, 2 = known to reach ROOT
    state = [2] + [0] * n
    for word in range(1, n + 1):
        path = []
        node = word
        while state[node] == 0:
            state[node] = 1
            path.append(node)
            node = sentence.heads[node - 1]
        if state[node] == 1:  # came back to a word of this path before reaching ROOT
            cycle = path[path.index(node):]
            raise ConlluFormatError(
                f"{_word_location(sentence, min(cycle))}: words {sorted(cycle)} form a cycle of heads"
            )
        for visited in path:
            state[visited] = 2


def rewrite_conllu(
    src: str | Path, dst: str | Path, columns_per_sentence: Iterable[dict[str, Sequence[str]]]
) -> None:
    """Copy the CoNLL-U file ``src`` (plain or gzip) to ``dst`` (plain UTF-8), replacing word columns.

    ``columns_per_sentence`` yields one ``{column name: values}`` per sentence of ``src`` (the sentences
    :func:`iter_conllu` yields, in order), one value per syntactic word, e.g.
    ``{"HEAD": ["2", "0"], "DEPREL": ["nsubj", "root"]}``; names from :data:`COLUMN_NAMES` except ID
    and FORM, which define the sentence. Comments, multi-word token lines, empty nodes, other columns
    and line endings are copied byte for byte. ``dst`` is written atomically: a crash leaves either
    the old file or the complete new one.
    """
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"CoNLL-U file not found: {src}")
    replacements = iter(columns_per_sentence)
    out: list[str] = []
    block: list[str] = []  # the lines of the sentence being read, line endings included
    word_rows: list[int] = []  # indices in ``block`` of its word lines
    first_line = 0

    def flush() -> None:
        if word_rows:
            _replace_columns(block, word_rows, next(replacements, None), f"{src}:{first_line}")
        out.extend(block)
        block.clear()
        word_rows.clear()

    with _open_text(src, newline="") as f:
        try:
            for number, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    block.append(raw)
                    flush()
                    continue
                if not line.startswith("#"):
                    fields = line.split("\t")
                    if len(fields) != COLUMNS:
                        raise ConlluFormatError(
                            f"{src}:{number}: expected {COLUMNS} tab-separated columns, found {len(fields)}"
                        )
                    if _INT_ID.fullmatch(fields[0]):
                        if not word_rows:
                            first_line = number
                        word_rows.append(len(block))
                block.append(raw)
        except UnicodeDecodeError as exc:
            raise ConlluFormatError(f"{src}: not UTF-8 text ({exc.reason}); CoNLL-U files are UTF-8") from exc
    flush()
    if next(replacements, None) is not None:
        raise ValueError(f"more replacement columns than the {src} has sentences")
    write_bytes(dst, "".join(out).encode("utf-8"))


def _replace_columns(
    block: list[str], word_rows: list[int], columns: dict[str, Sequence[str]] | None, where: str
) -> None:
    """Replace, in place, the named columns of the word lines ``block[word_rows]`` of one sentence."""
    if columns is None:
        raise ValueError(f"{where}: no replacement columns left for this sentence")
    for name, values in columns.items():
        if name not in COLUMN_NAMES[2:]:
            raise ValueError(f"{where}: cannot replace column {name!r}; choose from {COLUMN_NAMES[2:]}")
        if len(values) != len(word_rows):
            raise ValueError(f"{where}: {len(values)} {name} values for a sentence of {len(word_rows)} words")
        for value in values:
            if not value or any(c in value for c in "\t\r\n"):
                raise ValueError(f"{where}: {name} value {value!r} is empty or holds a tab or line break")
    indices = [(COLUMN_NAMES.index(name), values) for name, values in columns.items()]
    for k, row in enumerate(word_rows):
        raw = block[row]
        line = raw.rstrip("\r\n")
        fields = line.split("\t")
        for index, values in indices:
            fields[index] = str(values[k])
        block[row] = "\t".join(fields) + raw[len(line):]


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


def word_chars(word: str) -> str:
    """The characters of ``word`` a character model reads: all of them, or for a word longer than
    :data:`MAX_WORD_CHARS` its first and last ``MAX_WORD_CHARS // 2`` (prefix and suffix carry the tag)."""
    if len(word) <= MAX_WORD_CHARS:
        return word
    half = MAX_WORD_CHARS // 2
    return word[:half] + word[-half:]


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
    """Ids of one sentence: ``words`` ``[T]``, ``features`` ``[T, F]``, ``tags`` ``[T]``, ``chars`` ``[T, C]``
    (int64; ``chars`` right-padded with ``PAD_ID``, ``C`` the longest word's :func:`word_chars`)."""

    words: Tensor
    features: Tensor
    tags: Tensor
    chars: Tensor


class TaggingVocab:
    """Word, shape-feature, character and tag vocabularies built from the training sentences."""

    def __init__(self, words: Vocab, features: dict[str, Vocab], tags: TagVocab, tagset: TagSet,
                 chars: Vocab | None = None) -> None:
        self.words, self.features, self.tags, self.tagset = words, features, tags, tagset
        self.chars = chars if chars is not None else Vocab(Counter())  # empty: only PAD and UNK

    @classmethod
    def build(cls, train: Sequence[Sentence], tagset: TagSet, affix_min_count: int = 2) -> TaggingVocab:
        """Vocabularies from ``train``; affixes and characters rarer than ``affix_min_count`` map to UNK (too
        rare to learn)."""
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
        chars = Vocab(Counter(c for w in tokens for c in word_chars(w)), min_count=affix_min_count)
        return cls(words, features, tags, tagset, chars)

    def encode(self, sentence: Sentence) -> EncodedSentence:
        """Ids of ``sentence``; unknown words, affixes and characters map to UNK, unseen tags to ``len(self.tags)``."""
        words = torch.tensor([self.words.index(normalise_word(w)) for w in sentence.words], dtype=torch.long)
        features = torch.tensor(
            [[self.features[name].index(fn(w)) for name, fn in SHAPE_FEATURES.items()] for w in sentence.words],
            dtype=torch.long,
        )
        tags = torch.tensor([self.tags.index(t) for t in sentence.tags(self.tagset)], dtype=torch.long)
        spelled = [word_chars(w) for w in sentence.words]
        chars = torch.full((len(spelled), max(map(len, spelled), default=0)), PAD_ID, dtype=torch.long)
        for i, w in enumerate(spelled):
            chars[i, : len(w)] = torch.tensor([self.chars.index(c) for c in w], dtype=torch.long)
        return EncodedSentence(words, features, tags, chars)

    def state_dict(self) -> dict:
        """Everything needed to rebuild the vocabularies (stored in checkpoints)."""
        return {
            "words": self.words.state_dict(),
            "features": {name: v.state_dict() for name, v in self.features.items()},
            "tags": self.tags.itos,
            "tagset": self.tagset.value,
            "chars": self.chars.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> TaggingVocab:
        features = {name: Vocab.from_state_dict(c) for name, c in state["features"].items()}
        chars = Vocab.from_state_dict(state["chars"]) if "chars" in state else None  # absent in older models
        return cls(Vocab.from_state_dict(state["words"]), features, TagVocab(state["tags"]), TagSet(state["tagset"]),
                   chars)


@dataclass(frozen=True)
class Batch:
    """Padded sentences: ``words`` ``[B, T]``, ``features`` ``[B, T, F]``, ``tags`` ``[B, T]``
    (:data:`IGNORE_TAG` at padding), ``lengths`` ``[B]``, ``chars`` ``[B, T, C]`` (``PAD_ID`` at padding)."""

    words: Tensor
    features: Tensor
    tags: Tensor
    lengths: Tensor
    chars: Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.words, self.features, self.tags, self.lengths, self.chars)))


def make_batch(sentences: Sequence[EncodedSentence]) -> Batch:
    """Right-pad ``sentences`` into one :class:`Batch`."""
    if not sentences:
        raise ValueError("cannot batch zero sentences")
    lengths = torch.tensor([len(s.words) for s in sentences], dtype=torch.long)
    steps, n_features = int(lengths.max()), sentences[0].features.shape[1]
    words = torch.full((len(sentences), steps), PAD_ID, dtype=torch.long)
    features = torch.full((len(sentences), steps, n_features), PAD_ID, dtype=torch.long)
    tags = torch.full((len(sentences), steps), IGNORE_TAG, dtype=torch.long)
    chars = torch.full((len(sentences), steps, max(s.chars.shape[1] for s in sentences)), PAD_ID, dtype=torch.long)
    for b, s in enumerate(sentences):
        n = len(s.words)
        words[b, :n], features[b, :n], tags[b, :n] = s.words, s.features, s.tags
        chars[b, :n, : s.chars.shape[1]] = s.chars
    return Batch(words, features, tags, lengths, chars)


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

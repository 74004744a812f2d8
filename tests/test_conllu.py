"""CoNLL-U reader on good and malformed input; vocabularies, features, batching, word dropout."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from mesimp_gpu.data.conllu import (
    IGNORE_TAG,
    PAD_ID,
    UNK_ID,
    SHAPE_FEATURES,
    ConlluFormatError,
    TaggingVocab,
    Sentence,
    TagSet,
    capitalisation,
    digits,
    make_batch,
    read_conllu,
    word_counts,
    word_dropout,
)

GOOD = """# newdoc id = d1
# sent_id = s1
# text = I can't go.
1\tI\tI\tPRON\tPRP\t_\t3\tnsubj\t_\t_
2-3\tcan't\t_\t_\t_\t_\t_\t_\t_\t_
2\tca\tcan\tAUX\tMD\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
3.1\tgo\tgo\tVERB\tVB\t_\t_\t_\t0:root\t_
4\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_

# sent_id = s2
1\tCall\tcall\tVERB\tVB\t_\t0\troot\t_\t_
2\t555-1234\t555-1234\tNUM\tCD\t_\t1\tobj\t_\t_
"""


def write(tmp_path: Path, text: str, name: str = "x.conllu", compress: bool = False) -> Path:
    path = tmp_path / name
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_reads_sentences_skipping_ranges_and_empty_nodes(tmp_path: Path, compress: bool) -> None:
    # gzip detected from content: the name deliberately has no .gz suffix
    sentences = read_conllu(write(tmp_path, GOOD, compress=compress))
    assert [s.words for s in sentences] == [("I", "ca", "n't", "go", "."), ("Call", "555-1234")]
    assert sentences[0].tags(TagSet.XPOS) == ("PRP", "MD", "RB", "VB", ".")
    assert sentences[0].tags(TagSet.UPOS) == ("PRON", "AUX", "PART", "VERB", "PUNCT")
    assert sentences[1].source.endswith(":13")
    assert len(read_conllu(write(tmp_path, GOOD), limit=1)) == 1


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("1\tA\ta\tX\tX\t_\t0\troot\t_\n", 1, "10 tab-separated columns"),
        ("1 A a X X _ 0 root _ _\n", 1, "10 tab-separated columns"),
        ("1\tA\ta\tX\tX\t_\t0\troot\t_\t_\n3\tB\tb\tX\tX\t_\t1\tdep\t_\t_\n", 2, "out of order"),
        ("# c\n1\tA\ta\tX\tX\t_\t0\troot\t_\t_\nx\tB\tb\tX\tX\t_\t1\tdep\t_\t_\n", 3, "not an integer"),
        ("1\tA\ta\tX\tX\t_\t0\troot\t_\t_\n# late comment\n", 2, "comment line inside"),
        ("1\t\ta\tX\tX\t_\t0\troot\t_\t_\n", 1, "empty FORM"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConlluFormatError, match=message) as info:
        read_conllu(path)
    assert f"{path}:{line}:" in str(info.value)


def test_missing_file_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_conllu(tmp_path / "nope.conllu")
    path = tmp_path / "latin1.conllu"
    path.write_bytes("1\tcaf\xe9\tx\tX\tX\t_\t0\troot\t_\t_\n".encode("latin-1"))
    with pytest.raises(ConlluFormatError, match="UTF-8"):
        read_conllu(path)


def test_shape_features() -> None:
    assert [capitalisation(w) for w in ("the", "The", "USA", "iPhone", "--", "3D")] == [
        "lower", "title", "upper", "mixed", "none", "upper"]
    assert [digits(w) for w in ("a", "1,000.5", "3D")] == ["none", "number", "some"]
    assert len(SHAPE_FEATURES) == 7


def test_vocab_encode_and_batch(tmp_path: Path) -> None:
    train = read_conllu(write(tmp_path, GOOD))
    vocab = TaggingVocab.build(train, TagSet.XPOS)
    assert vocab.tags.itos == [".", "CD", "MD", "PRP", "RB", "VB"]
    encoded = [vocab.encode(s) for s in train]
    assert encoded[0].features.shape == (5, len(SHAPE_FEATURES))
    unknown = vocab.encode(Sentence(("Zebra",), ("NOUN",), ("VB",), "here:1"))
    assert unknown.words.tolist() == [UNK_ID]
    assert vocab.encode(Sentence(("a",), ("X",), ("NN",), "here:1")).tags.tolist() == [len(vocab.tags)]
    batch = make_batch(encoded)
    assert batch.words.shape == (2, 5) and batch.lengths.tolist() == [5, 2]
    assert batch.words[1, 2:].tolist() == [PAD_ID] * 3 and batch.tags[1, 2:].tolist() == [IGNORE_TAG] * 3
    rebuilt = TaggingVocab.from_state_dict(vocab.state_dict())
    assert torch.equal(rebuilt.encode(train[0]).words, encoded[0].words)
    assert torch.equal(rebuilt.encode(train[0]).features, encoded[0].features)


def test_missing_tag_column_is_explained(tmp_path: Path) -> None:
    path = write(tmp_path, "1\tA\ta\tX\t_\t_\t0\troot\t_\t_\n")
    with pytest.raises(ValueError, match="--tagset upos"):
        TaggingVocab.build(read_conllu(path), TagSet.XPOS)


def test_word_dropout_rate_and_padding(tmp_path: Path) -> None:
    counts = torch.tensor([0, 0, 1, 1000])  # pad, unk, a singleton, a frequent word
    words = torch.tensor([2] * 4000 + [3] * 4000 + [PAD_ID] * 10)
    out = word_dropout(words, counts, alpha=0.25, generator=torch.Generator().manual_seed(0))
    assert abs((out[:4000] == UNK_ID).float().mean().item() - 0.2) < 0.03  # 0.25 / 1.25
    assert (out[4000:8000] == UNK_ID).sum() < 10
    assert out[8000:].tolist() == [PAD_ID] * 10
    assert word_counts(TaggingVocab.build(read_conllu(write(tmp_path, GOOD)), TagSet.XPOS).words)[:2].tolist() == [0, 0]


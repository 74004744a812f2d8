"""CoNLL-U trees: HEAD and DEPREL read, tree checks naming file and line, and the column rewriter."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from mesimp_gpu.data.conllu import NO_HEAD, ConlluFormatError, Sentence, check_tree, read_conllu, rewrite_conllu

# comments, a multi-word token (2-3), an empty node (3.1), a last sentence without its closing blank line
TEXT = """# newdoc id = d1
# sent_id = s1
# text = I can't go.
1\tI\tI\tPRON\tPRP\t_\t4\tnsubj\t4:nsubj\t_
2-3\tcan't\t_\t_\t_\t_\t_\t_\t_\t_
2\tca\tcan\tAUX\tMD\tVerbForm=Fin\t4\taux\t4:aux\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t4:advmod\t_
3.1\tgo\tgo\tVERB\tVB\t_\t_\t_\t0:root\t_
4\tgo\tgo\tVERB\tVB\tVerbForm=Inf\t0\troot\t0:root\tSpaceAfter=No
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t4:punct\t_

# sent_id = s2
1\tCall\tcall\tVERB\tVB\t_\t0\troot\t0:root\t_
2\tme\tI\tPRON\tPRP\t_\t1\tobj\t1:obj\t_"""


def write(tmp_path: Path, text: str, name: str = "x.conllu") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_reads_heads_deprels_and_lines(tmp_path: Path) -> None:
    first, second = read_conllu(write(tmp_path, TEXT), require_trees=True)
    assert first.heads == (4, 4, 4, 0, 4)
    assert first.deprels == ("nsubj", "aux", "advmod", "root", "punct")
    assert first.lines == (4, 6, 7, 9, 10)
    assert second.heads == (0, 1) and second.deprels == ("root", "obj") and second.lines == (13, 14)
    # built by hand without a tree, as the tagger's callers do
    assert Sentence(("a",), ("X",), ("X",), "here:1").heads == ()


def test_tagger_files_without_trees_still_read(tmp_path: Path) -> None:
    path = write(tmp_path, "1\tA\ta\tX\tX\t_\t_\t_\t_\t_\n2\tB\tb\tX\tX\t_\t_\t_\t_\t_\n")
    (sentence,) = read_conllu(path)
    assert sentence.heads == (NO_HEAD, NO_HEAD)
    with pytest.raises(ConlluFormatError, match="not an integer"):
        read_conllu(path, require_trees=True)


def tree(heads: list[str], deprels: list[str] | None = None) -> str:
    """A sentence with the given HEAD (and DEPREL) columns, after two comment lines."""
    deprels = deprels or ["dep"] * len(heads)
    rows = [f"{i}\tw{i}\tw\tX\tX\t_\t{h}\t{d}\t_\t_" for i, (h, d) in enumerate(zip(heads, deprels), start=1)]
    return "# sent_id = bad\n# text = w1 w2 w3\n" + "\n".join(rows) + "\n"


@pytest.mark.parametrize(
    ("heads", "deprels", "line", "message"),
    [
        (["0", "x", "1"], None, 4, "HEAD of word 2 is not an integer"),
        (["0", "-1", "1"], None, 4, "HEAD of word 2 is not an integer"),
        (["0", "1", "4"], None, 5, "HEAD 4 of word 3 is out of range 0..3"),
        (["2", "3", "1"], None, 3, "no word has HEAD 0"),  # no root: the sentence's first line
        (["0", "1", "0"], None, 5, "word 3 is a second root"),
        (["0", "3", "2"], None, 4, r"words \[2, 3\] form a cycle"),
        (["0", "2", "1"], None, 4, r"words \[2\] form a cycle"),  # a word as its own head
        (["0", "1", "1"], ["root", "", "dep"], 4, "DEPREL of word 2 is ''"),
        (["0", "1", "1"], ["root", "dep", "_"], 5, "DEPREL of word 3 is '_'"),
    ],
)
def test_broken_tree_names_file_and_line(
    tmp_path: Path, heads: list[str], deprels: list[str] | None, line: int, message: str
) -> None:
    path = write(tmp_path, tree(heads, deprels))
    (sentence,) = read_conllu(path)  # reading without require_trees accepts it
    for check in (lambda: check_tree(sentence), lambda: read_conllu(path, require_trees=True)):
        with pytest.raises(ConlluFormatError, match=message) as info:
            check()
        assert f"{path}:{line}:" in str(info.value)


def test_check_tree_of_a_sentence_built_by_hand() -> None:
    check_tree(Sentence(("a", "b"), ("X", "X"), ("X", "X"), "here:7", (0, 1), ("root", "dep")))
    with pytest.raises(ConlluFormatError, match="here:7: .*no HEAD and DEPREL"):
        check_tree(Sentence(("a",), ("X",), ("X",), "here:7"))
    with pytest.raises(ConlluFormatError, match="here:7: .*second root"):
        check_tree(Sentence(("a", "b"), ("X", "X"), ("X", "X"), "here:7", (0, 0), ("root", "root")))


def gold_columns(path: Path) -> list[dict[str, list[str]]]:
    return [
        {"HEAD": [str(h) for h in s.heads], "DEPREL": list(s.deprels), "XPOS": list(s.xpos)}
        for s in read_conllu(path)
    ]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("compress", [False, True])
def test_rewrite_with_gold_columns_is_byte_identical(tmp_path: Path, newline: str, compress: bool) -> None:
    text = TEXT.replace("\n", newline)
    src = tmp_path / "src.conllu"
    if compress:
        src.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        src.write_bytes(text.encode("utf-8"))
    dst = tmp_path / "out" / "copy.conllu"
    rewrite_conllu(src, dst, gold_columns(src))
    assert dst.read_bytes() == text.encode("utf-8")
    assert [p.name for p in dst.parent.iterdir()] == ["copy.conllu"]  # no temporary file left


def test_rewrite_replaces_only_the_named_columns_of_words(tmp_path: Path) -> None:
    src = write(tmp_path, TEXT)
    dst = tmp_path / "parsed.conllu"
    rewrite_conllu(src, dst, [
        {"HEAD": ["2", "0", "2", "2", "2"], "DEPREL": ["nsubj", "root", "advmod", "xcomp", "punct"]},
        {"UPOS": ["VERB", "PRON"], "HEAD": ["0", "1"]},
    ])
    lines = dst.read_text(encoding="utf-8").split("\n")
    original = TEXT.split("\n")
    changed = {i for i, (a, b) in enumerate(zip(lines, original)) if a != b}
    assert len(lines) == len(original) and changed == {3, 5, 6, 8, 9}
    assert lines[3] == "1\tI\tI\tPRON\tPRP\t_\t2\tnsubj\t4:nsubj\t_"  # DEPS stays as it was
    assert lines[5] == "2\tca\tcan\tAUX\tMD\tVerbForm=Fin\t0\troot\t4:aux\t_"
    assert lines[8] == "4\tgo\tgo\tVERB\tVB\tVerbForm=Inf\t2\txcomp\t0:root\tSpaceAfter=No"
    assert read_conllu(dst)[1].upos == ("VERB", "PRON")


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ([{"HEAD": ["4"] * 5}], "no replacement columns left"),
        ([{"HEAD": ["4"] * 5}, {"HEAD": ["0", "1"]}, {"HEAD": ["0"]}], "more replacement columns"),
        ([{"HEAD": ["4"] * 4}, {"HEAD": ["0", "1"]}], "4 HEAD values for a sentence of 5 words"),
        ([{"FORM": ["x"] * 5}, {}], "cannot replace column 'FORM'"),
        ([{"DEPREL": ["a", "b\tc", "d", "e", "f"]}, {}], "holds a tab"),
        ([{"DEPREL": ["a", "", "d", "e", "f"]}, {}], "is empty"),
    ],
)
def test_rewrite_rejects_mismatched_columns_and_leaves_dst_alone(
    tmp_path: Path, columns: list[dict[str, list[str]]], message: str
) -> None:
    src = write(tmp_path, TEXT)
    dst = write(tmp_path, "old\n", name="dst.conllu")
    with pytest.raises(ValueError, match=message):
        rewrite_conllu(src, dst, columns)
    assert dst.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.conllu", "x.conllu"]

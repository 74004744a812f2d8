"""Tagger and POS trainer smoke tests on a tiny synthetic treebank written to tmp_path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mesimp_gpu.cli import app
from mesimp_gpu.data.conllu import SHAPE_FEATURES, TaggingVocab, TagSet, make_batch, read_conllu
from mesimp_gpu.lstm import GateSelection
from mesimp_gpu.meprop import MePropConfig
from mesimp_gpu.models.tagger import Tagger
from mesimp_gpu.train.pos import Method, PosConfig, train_pos

LEXICON = {"DT": ["the", "a", "this"], "NN": ["dog", "cat", "house", "idea"], "VBZ": ["runs", "sees", "likes"],
           "JJ": ["big", "red", "old"], ".": ["."], "CD": ["3", "1,000", "42"]}
PATTERNS = [["DT", "NN", "VBZ", "DT", "JJ", "NN", "."], ["DT", "JJ", "NN", "VBZ", "CD", "NN", "."],
            ["NN", "VBZ", "."]]


def conllu_text(sentences: int, seed: int) -> str:
    """CoNLL-U text of random sentences from a toy grammar (tags predictable from words)."""
    rng = random.Random(seed)
    lines = []
    for s in range(sentences):
        lines.append(f"# sent_id = {s}")
        for i, tag in enumerate(rng.choice(PATTERNS), start=1):
            word = rng.choice(LEXICON[tag])
            word = word.capitalize() if i == 1 else word
            lines.append(f"{i}\t{word}\t{word.lower()}\tX\t{tag}\t_\t0\tdep\t_\t_")
        lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture
def treebank(tmp_path: Path) -> Path:
    folder = tmp_path / "tb"
    folder.mkdir()
    for split, n, seed in (("train", 48, 0), ("dev", 12, 1), ("test", 12, 2)):
        (folder / f"toy-ud-{split}.conllu").write_text(conllu_text(n, seed))
    return folder


def small_config(treebank: Path, out: Path, **changes) -> PosConfig:
    base = dict(hidden=8, k=2, epochs=2, batch_size=4, lr=0.01, chunks=2, data_dir=str(treebank), out=str(out),
                progress=False, backend="torch")
    return PosConfig(**{**base, **changes})


def test_tagger_shapes_and_masked_loss(treebank: Path) -> None:
    sentences = read_conllu(treebank / "toy-ud-train.conllu")[:3]
    vocab = TaggingVocab.build(sentences, TagSet.XPOS)
    model = Tagger(len(vocab.words), [len(v) for v in vocab.features.values()], len(vocab.tags),
                   MePropConfig(k=2, backend="torch"), hidden=6, bidirectional=True)
    batch = make_batch([vocab.encode(s) for s in sentences])
    logits = model(batch)
    assert logits.shape == (3, int(batch.lengths.max()), len(vocab.tags))
    assert model.lstm.input_size == 50 + 20 * len(SHAPE_FEATURES)
    # padded positions contribute nothing to the loss
    changed = logits.detach().clone()
    changed[batch.tags == -100] = 1e3
    assert torch.isclose(model.loss(changed, batch.tags), model.loss(logits, batch.tags))


@pytest.mark.parametrize("method", [Method.DENSE, Method.MEPROP])
def test_training_learns_toy_grammar(treebank: Path, tmp_path: Path, method: Method) -> None:
    results = train_pos(small_config(treebank, tmp_path / "run", method=method, hidden=16, epochs=4))
    assert results["finished"] and len(results["history"]) == 4 * 2
    assert results["history"][-1]["train_loss"] < results["history"][0]["train_loss"]
    assert results["final"]["best_dev_acc"] > 80.0  # the toy tags are (almost) a function of the word
    assert set(results["epoch_seconds"][0]) == {"epoch", "forward", "backward", "update"}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["final"] == results["final"]


def test_mesimp_shrinks_and_resume_matches(treebank: Path, tmp_path: Path) -> None:
    changes = dict(method=Method.MESIMP, selection=GateSelection.ALL, prune=0.2, cycle=1, epochs=3)
    full = train_pos(small_config(treebank, tmp_path / "full", **changes))
    sizes = [r["sizes"][1] for r in full["history"]]
    assert sizes[-1] < 8 and sizes == sorted(sizes, reverse=True)
    assert [r["pruned"] for r in full["history"]] == [True, True, False, False, True, True]  # odd cycle: fixed
    assert [r["moments_reset"] for r in full["history"]] == [False, True] * 3  # after each cycle's last piece

    train_pos(small_config(treebank, tmp_path / "part", **{**changes, "epochs": 1}))
    resumed = train_pos(small_config(treebank, tmp_path / "part", **changes), resume=True)
    assert [r["dev_acc"] for r in resumed["history"]] == [r["dev_acc"] for r in full["history"]]
    assert resumed["final"]["sizes"] == full["final"]["sizes"]


def test_resume_refuses_changed_settings(treebank: Path, tmp_path: Path) -> None:
    train_pos(small_config(treebank, tmp_path / "run", epochs=1))
    with pytest.raises(ValueError, match="different settings"):
        train_pos(small_config(treebank, tmp_path / "run", k=3), resume=True)


def test_cli_runs_and_reports_bad_input(treebank: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["train", "pos", "--hidden", "8", "--epochs", "1", "--no-progress", "--backend", "torch"]
    ok = runner.invoke(app, [*common, "--data-dir", str(treebank), "--out", str(tmp_path / "cli")])
    assert ok.exit_code == 0, ok.output
    assert "test accuracy" in ok.output and (tmp_path / "cli" / "results.json").is_file()
    missing = runner.invoke(app, [*common, "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "--data-dir" in missing.output
    (treebank / "toy-ud-dev.conllu").write_text("1\tbroken line\n")
    broken = runner.invoke(app, [*common, "--data-dir", str(treebank), "--out", str(tmp_path / "y")])
    assert broken.exit_code == 2 and "toy-ud-dev.conllu:1" in broken.output


def test_saved_tagger_scores_as_in_training_and_tags_a_copy(treebank: Path, tmp_path: Path) -> None:
    from mesimp_gpu.models.tagger import load_tagger
    from mesimp_gpu.train.inference import ApplyConfig, evaluate_tagger, tag_file

    run = tmp_path / "run"
    results = train_pos(small_config(treebank, run, method=Method.MESIMP, hidden=16, epochs=2, prune=0.3,
                                     bidirectional=True))
    final = results["final"]
    model, _ = load_tagger(run)
    best = next(h for h in results["history"] if h["step"] == final["best_step"])
    assert model.hidden_sizes == best["sizes"][1:-1], "the saved tagger is the one at the best dev score"
    dev = treebank / "toy-ud-dev.conllu"
    assert evaluate_tagger(str(run), str(dev), "cpu")["accuracy"] == pytest.approx(final["best_dev_acc"])
    # unknown words, characters and tags never crash tagging; only the XPOS column changes
    source = tmp_path / "new.conllu"
    source.write_text("# text = Zyzzyva ŋ€ runs\n1\tZyzzyva\t_\t_\t_\t_\t_\t_\t_\t_\n"
                      "2\tŋ€\t_\t_\t??\t_\t_\t_\t_\tSpaceAfter=No\n3\truns\t_\t_\t_\t_\t_\t_\t_\t_\n\n")
    out = tmp_path / "tagged.conllu"
    stats = tag_file(ApplyConfig(str(run), str(source), str(out)))
    assert stats["tokens"] == 3 and stats["column"] == "XPOS"
    for a, b in zip(source.read_text().splitlines(), out.read_text().splitlines()):
        if "\t" not in a:
            assert a == b
            continue
        changed = [i for i, (x, y) in enumerate(zip(a.split("\t"), b.split("\t"))) if x != y]
        assert set(changed) <= {4}
        assert b.split("\t")[4] in {"DT", "NN", "VBZ", "JJ", ".", "CD"}


def test_tag_and_evaluate_commands(treebank: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_pos(small_config(treebank, run, epochs=1))
    runner = CliRunner()
    tagged = runner.invoke(app, ["tag", str(run), str(treebank / "toy-ud-test.conllu"), "-o", str(tmp_path / "t.conllu")])
    assert tagged.exit_code == 0 and "tokens/s" in tagged.output
    scored = runner.invoke(app, ["evaluate", str(run), "--data", str(treebank / "toy-ud-test.conllu")])
    assert scored.exit_code == 0 and "XPOS accuracy" in scored.output
    empty = tmp_path / "empty.conllu"
    empty.write_text("")
    result = runner.invoke(app, ["tag", str(run), str(empty), "-o", str(tmp_path / "e.conllu")])
    assert result.exit_code == 2 and "no sentences" in result.output

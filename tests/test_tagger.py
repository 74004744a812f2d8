"""Tagger and POS trainer smoke tests on a tiny synthetic treebank written to tmp_path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mesimp_gpu.cli import app
from mesimp_gpu.data.conllu import (
    MAX_WORD_CHARS,
    PAD_ID,
    SHAPE_FEATURES,
    UNK_ID,
    Sentence,
    TaggingVocab,
    TagSet,
    make_batch,
    read_conllu,
    word_chars,
)
from mesimp_gpu.lstm import GateSelection
from mesimp_gpu.meprop import MePropConfig
from mesimp_gpu.models.tagger import Tagger
from mesimp_gpu.train.pos import PRESETS, Method, PosConfig, Preset, pos_config, train_pos

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


def test_characters_encode_with_unk_and_pad(treebank: Path) -> None:
    train = read_conllu(treebank / "toy-ud-train.conllu")
    vocab = TaggingVocab.build(train, TagSet.XPOS)
    seen = {c for s in train for w in s.words for c in w}
    assert set(vocab.chars.itos[2:]) <= seen and "d" in vocab.chars.stoi
    long_word = "a" * 15 + "xyz" + "b" * 15
    assert word_chars(long_word) == "a" * 10 + "b" * 10 and word_chars("dog") == "dog"
    encoded = vocab.encode(Sentence(("dog", "ŋ€d", long_word), ("X",) * 3, ("NN",) * 3, "here:1"))
    assert encoded.chars.shape == (3, MAX_WORD_CHARS)
    d = vocab.chars.index("d")
    assert encoded.chars[0, :3].tolist() == [d, vocab.chars.index("o"), vocab.chars.index("g")]
    assert encoded.chars[0, 3:].tolist() == [PAD_ID] * (MAX_WORD_CHARS - 3)
    assert encoded.chars[1, :3].tolist() == [UNK_ID, UNK_ID, d]  # characters never seen in train
    assert encoded.words[1].item() == UNK_ID
    rebuilt = TaggingVocab.from_state_dict(vocab.state_dict())
    assert torch.equal(rebuilt.encode(train[0]).chars, vocab.encode(train[0]).chars)
    older = {k: v for k, v in vocab.state_dict().items() if k != "chars"}  # a model saved before characters
    assert set(TaggingVocab.from_state_dict(older).encode(train[0]).chars.unique().tolist()) == {PAD_ID, UNK_ID}


def test_char_cnn_ignores_padding_and_dropout_only_in_training(treebank: Path) -> None:
    sentences = read_conllu(treebank / "toy-ud-train.conllu")
    vocab = TaggingVocab.build(sentences, TagSet.XPOS)
    torch.manual_seed(0)
    model = Tagger(len(vocab.words), [len(v) for v in vocab.features.values()], len(vocab.tags),
                   MePropConfig(k=2, backend="torch"), hidden=6, bidirectional=True,
                   char_vocab_size=len(vocab.chars), char_dim=5, char_filters=7, dropout=0.5).eval()
    assert model.lstm.input_size == 50 + 20 * len(SHAPE_FEATURES) + 7
    short = Sentence(("a", "dog"), ("X",) * 2, ("DT", "NN"), "x:1")
    longer = Sentence(("the", "big", "house", "Zyzzyva"), ("X",) * 4, ("DT",) * 4, "x:2")
    alone = make_batch([vocab.encode(short)])
    together = make_batch([vocab.encode(short), vocab.encode(longer)])  # more characters and tokens of padding
    assert alone.chars.shape[1:] == (2, 3) and together.chars.shape[1:] == (4, 7)
    chars_alone, chars_together = model.char_vectors(alone.chars), model.char_vectors(together.chars)
    assert torch.allclose(chars_alone[0], chars_together[0, :2], atol=1e-6)
    assert torch.count_nonzero(chars_together[0, 2:]) == 0  # padding tokens get zeros
    assert torch.allclose(model(alone)[0], model(together)[0, :2], atol=1e-5)  # and evaluation is deterministic
    model.train()
    assert not torch.allclose(model(alone), model(alone))  # dropout acts in training
    # the gradient reaches the character embeddings of real characters only, never the padding entry
    model.loss(model(together), together.tags).backward()
    grads = model.chars.embedding.weight.grad
    assert grads[PAD_ID].abs().sum() == 0 and grads[vocab.chars.index("d")].abs().sum() > 0


def test_presets_and_validation() -> None:
    paper = pos_config(Preset.PAPER, data_dir="x")
    assert (paper.hidden, paper.bidirectional, paper.k, paper.selection, paper.char_filters, paper.dropout) == (
        500, False, 5, GateSelection.PER_GATE, 0, 0.0)
    good = pos_config(Preset.COMPETITIVE, data_dir="x", method=Method.DENSE, epochs=3)
    assert good.bidirectional and good.char_filters > 0 and good.dropout > 0 and good.lr_decay < 1
    assert good.method is Method.DENSE and good.epochs == 3  # given settings win over the preset
    assert set(PRESETS[Preset.COMPETITIVE]).isdisjoint({"method", "k"})  # methods compared on one preset
    for bad, match in ((dict(dropout=1.0), "--dropout"), (dict(lr_decay=0.0), "--lr-decay"),
                       (dict(char_filters=-1), "--char-filters"), (dict(hidden_sizes=(4,), bidirectional=True),
                                                                   "--hidden-sizes"),
                       (dict(compare_same_size=True), "--compare-same-size")):
        with pytest.raises(ValueError, match=match):
            PosConfig(data_dir="x", **bad)


class LearningRates:
    """Records the optimizer's learning rate after each piece."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_chunk_end(self, trainer, epoch: int, chunk: int) -> dict:
        self.seen.append(trainer.optimizer.param_groups[0]["lr"])
        return {}


def test_learning_rate_decays_per_epoch_and_resumes(treebank: Path, tmp_path: Path) -> None:
    rates = LearningRates()
    train_pos(small_config(treebank, tmp_path / "run", epochs=3, lr_decay=0.5, char_filters=4), hooks=(rates,))
    assert rates.seen == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025])
    resumed = LearningRates()
    train_pos(small_config(treebank, tmp_path / "part", epochs=1, lr_decay=0.5, char_filters=4))
    train_pos(small_config(treebank, tmp_path / "part", epochs=3, lr_decay=0.5, char_filters=4), resume=True,
              hooks=(resumed,))
    assert resumed.seen == pytest.approx(rates.seen[2:])


def test_mesimp_with_same_size_baseline(treebank: Path, tmp_path: Path) -> None:
    results = train_pos(small_config(treebank, tmp_path / "run", method=Method.MESIMP, hidden=16, prune=0.3,
                                     bidirectional=True, char_filters=4, compare_same_size=True))
    sizes = results["final"]["sizes"][1:-1]
    assert len(sizes) == 2 and sum(sizes) < 32
    same = results["same_size"]
    assert same["sizes"][1:-1] == sizes and same["out"] == str(tmp_path / "run" / "same-size")
    saved = json.loads((tmp_path / "run" / "same-size" / "results.json").read_text())
    assert saved["config"]["method"] == "dense" and saved["config"]["hidden_sizes"] == sizes
    assert saved["history"][0]["sizes"][1:-1] == sizes  # the baseline has meSimp's final size from the start


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
    preset = runner.invoke(app, [*common, "--preset", "competitive", "--char-filters", "5", "--data-dir",
                                 str(treebank), "--out", str(tmp_path / "preset")])
    assert preset.exit_code == 0, preset.output
    config = json.loads((tmp_path / "preset" / "results.json").read_text())["config"]
    assert (config["hidden"], config["epochs"], config["char_filters"], config["bidirectional"]) == (8, 1, 5, True)
    assert config["dropout"] == PRESETS[Preset.COMPETITIVE]["dropout"]
    helped = runner.invoke(app, ["train", "pos", "--help"])
    assert all(word in helped.output for word in ("--preset", "competitive", "--char-filters", "--dropout",
                                                  "--lr-decay", "--bidirectional"))
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
                                     bidirectional=True, char_filters=6, dropout=0.2))
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


def bench_config(tmp_path: Path, ud_dir: str, **changes):
    from mesimp_gpu.bench.config import Suite, make_config

    settings = dict(suites=(Suite.TAGGER,), tagger_epochs=2, tagger_k=1, tagger_hidden=48, tagger_decode_repeats=2,
                    ud_dir=ud_dir, threads=1, out_dir=str(tmp_path / "bench"))
    return make_config(**{**settings, **changes})


def test_bench_tagger_suite_trains_three_methods_and_times_both_taggers(treebank: Path, tmp_path: Path) -> None:
    from mesimp_gpu.bench.config import Provider, Suite
    from mesimp_gpu.bench.report import load, render
    from mesimp_gpu.bench.runner import run_bench

    path, doc = run_bench(bench_config(tmp_path, str(treebank)), command="mesimp-gpu bench (tagger test)",
                          log=lambda line: None)
    rows = load(path)["rows"]
    assert all(r["suite"] == Suite.TAGGER.value and r["status"] == "ok" for r in rows)
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["label"] for r in train] == ["dense", "meprop", "mesimp"] and [r["k"] for r in train] == [None, 1, 1]
    for r in train:
        assert r["sentences"] == 48 and r["tokens"] > 48 and r["epochs"] == 2 and r["repeats"] == 2
        assert r["bidirectional"] and r["char_filters"] > 0 and r["hidden"] == 48
        assert set(r["phases_s"]) == {"forward", "backward", "update"} and all(v > 0 for v in r["phases_s"].values())
        assert r["run_s"] == pytest.approx(2 * r["median_s"]) and r["tokens_per_s"] == pytest.approx(
            r["tokens"] / r["median_s"])
        assert 0 <= r["test_acc"] <= 100
    assert train[0]["speedup"] == train[0]["backward_speedup"] == 1.0
    assert train[1]["backward_speedup"] == pytest.approx(train[0]["phases_s"]["backward"]
                                                         / train[1]["phases_s"]["backward"])
    assert train[0]["sizes"][1:-1] == train[1]["sizes"][1:-1] == [48, 48], "only meSimp prunes"
    assert sum(train[2]["sizes"][1:-1]) < 96, "meSimp removed LSTM units"
    tagged = [r for r in rows if r["kind"] == "tag"]
    assert [r["provider"] for r in tagged] == [Provider.DENSE.value, Provider.SIMPLIFIED.value]
    dense, simplified = tagged
    assert dense["hidden"] == [48, 48] and simplified["hidden"] == train[2]["sizes_at_best_dev"][1:-1]
    assert simplified["parameters"] < dense["parameters"]
    for r in tagged:
        assert r["sentences"] == 12 and r["repeats"] == 2 and r["tokens_per_s"] == pytest.approx(
            r["tokens"] / r["median_s"])
        assert r["check_passed"], r  # the timed model is the one the trainer scored (same dev accuracy)
    assert simplified["speedup"] == pytest.approx(dense["median_s"] / simplified["median_s"])
    assert any(n.startswith("tagger suite: all training sentences") for n in doc["header"]["notes"])
    text = render(load(path))
    assert "## POS tagging: BiLSTM tagger on tb" in text and "### Tagging: tokens per second" in text
    assert "| dense tagger | 48-48 |" in text and "| meprop | 1 |" in text


def test_bench_tagger_suite_without_a_treebank_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mesimp_gpu.bench.parse import UD_ENV
    from mesimp_gpu.bench.report import render
    from mesimp_gpu.bench.runner import run_bench

    monkeypatch.delenv(UD_ENV, raising=False)
    _, doc = run_bench(bench_config(tmp_path, str(tmp_path / "nowhere")), log=lambda line: None)
    [row] = doc["rows"]
    assert row["status"] == "skipped" and "nowhere" in row["reason"] and "--ud-dir" in row["reason"]
    assert "## POS tagging\n\nSkipped: no usable treebank" in render(doc)

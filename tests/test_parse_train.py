"""The parser's trainer, saved model and commands, on small slices of UD English EWT."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mesimp_gpu.cli import app
from mesimp_gpu.data.conllu import check_tree, read_conllu
from mesimp_gpu.models.parser import load_parser
from mesimp_gpu.train.inference import ApplyConfig, evaluate_parser, parse_file
from mesimp_gpu.train.parse import ParseConfig, Preset, parse_config, train_parse
from mesimp_gpu.train.settings import Method


def head_sentences(source: Path, target: Path, count: int) -> Path:
    """Write the first ``count`` sentences of the (gzipped) CoNLL-U file ``source`` to ``target``."""
    with gzip.open(source, "rt", encoding="utf-8") as f:
        blocks = f.read().split("\n\n")[:count]
    target.write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def treebank(ud_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ewt-slice")
    sizes = {"train": 300, "dev": 60, "test": 60}
    return {split: head_sentences(ud_dir / f"en_ewt-ud-{split}.conllu.gz", folder / f"{split}.conllu", n)
            for split, n in sizes.items()}


def tiny(treebank: dict[str, Path], out: Path, **overrides) -> ParseConfig:
    settings = dict(method=Method.MESIMP, k=5, hidden=40, dim=8, epochs=2, batch_size=256, chunks=2, cycle=1,
                    prune=0.1, train_file=str(treebank["train"]), dev_file=str(treebank["dev"]),
                    test_file=str(treebank["test"]), out=str(out), progress=False, backend="torch", seed=3)
    settings.update(overrides)
    return ParseConfig(**settings)


def test_mesimp_training_shrinks_the_hidden_layer_and_saves_the_scored_model(treebank, tmp_path: Path) -> None:
    results = train_parse(tiny(treebank, tmp_path))
    history, final = results["history"], results["final"]
    assert [(h["epoch"], h["chunk"]) for h in history] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [h["pruned"] for h in history] == [True, True, False, False]
    assert history[0]["sizes"][1] < 40, "the first prune step removed hidden units"
    assert history[2]["sizes"] == history[3]["sizes"] == history[1]["sizes"], "odd cycles keep the size"
    assert final["kept"] == history[-1]["sizes"][1] and final["parameters_final"] < final["parameters_initial"]
    data = results["data"]
    assert data["train"]["sentences"] == 300 and data["train_transitions"] > 0
    assert 0 <= data["train_non_projective_skipped"] < 300
    # every training word takes two transitions (shift + arc) in the projective sentences kept
    assert data["train_transitions"] % 2 == 0
    for scores in (final["dev_at_best"], final["test_at_best_dev"], final["test_final_network"]):
        assert set(scores) == {"uas", "las", "uas_no_punct", "las_no_punct"}
        assert all(0.0 <= v <= 100.0 for v in scores.values()) and scores["las"] <= scores["uas"]
    model, _ = load_parser(tmp_path)
    best = next(h for h in history if h["step"] == final["best_step"])
    assert model.hidden_size == best["sizes"][1] == final["kept_at_best_dev"]
    # the saved model is the one scored at the best dev: scoring it again gives the same numbers
    again = evaluate_parser(str(tmp_path), str(treebank["dev"]), "cpu")
    assert again["uas"] == pytest.approx(final["dev_at_best"]["uas"])
    assert again["las"] == pytest.approx(final["dev_at_best"]["las"])
    assert (tmp_path / "hidden_sizes.png").stat().st_size > 0


def test_resumed_run_equals_an_uninterrupted_one(treebank, tmp_path: Path) -> None:
    full = train_parse(tiny(treebank, tmp_path / "full", epochs=3))
    train_parse(tiny(treebank, tmp_path / "cut", epochs=1))
    resumed = train_parse(tiny(treebank, tmp_path / "cut", epochs=3), resume=True)

    def metrics(results):
        return [(h["step"], h["train_loss"], h["dev"], h["sizes"]) for h in results["history"]]

    assert metrics(resumed) == metrics(full)


def test_dense_and_meprop_train_and_compare_same_size(treebank, tmp_path: Path) -> None:
    dense = train_parse(tiny(treebank, tmp_path / "dense", method=Method.DENSE, epochs=1))
    assert dense["final"]["kept"] == 40
    results = train_parse(tiny(treebank, tmp_path / "mesimp", epochs=1, compare_same_size=True))
    same = results["same_size"]
    assert same["kept"] == results["final"]["kept"], "the baseline has the simplified size"
    assert Path(same["out"], "results.json").is_file()


def test_parse_writes_trees_into_a_copy_of_the_input(treebank, tmp_path: Path) -> None:
    train_parse(tiny(treebank, tmp_path / "run", method=Method.DENSE, epochs=1))
    output = tmp_path / "parsed.conllu"
    stats = parse_file(ApplyConfig(str(tmp_path / "run"), str(treebank["test"]), str(output)))
    assert stats["sentences"] == 60 and stats["sentences_per_second"] > 0
    before, after = read_conllu(treebank["test"]), read_conllu(output, require_trees=True)
    assert [s.words for s in after] == [s.words for s in before]
    for sentence in after:
        check_tree(sentence)  # a single-rooted tree over every word
    original = treebank["test"].read_text().splitlines()
    written = output.read_text().splitlines()
    assert len(original) == len(written)
    for a, b in zip(original, written):
        if "\t" not in a:
            assert a == b, "comments and blank lines are copied unchanged"
            continue
        cols_a, cols_b = a.split("\t"), b.split("\t")
        changed = {i for i, (x, y) in enumerate(zip(cols_a, cols_b)) if x != y}
        assert changed <= {6, 7}, "only HEAD and DEPREL change"


def test_preset_fills_the_papers_settings(treebank, tmp_path: Path) -> None:
    config = parse_config(Preset.PAPER, train_file=str(treebank["train"]), dev_file=str(treebank["dev"]),
                          test_file=str(treebank["test"]), batch_size=500)
    assert (config.optimizer.value, config.lr, config.activation.value, config.k, config.hidden) == (
        "adagrad", 0.01, "cube", 20, 500)
    assert config.batch_size == 500, "an explicit option overrides the preset"


@pytest.mark.parametrize("overrides, message", [
    (dict(k=50), "exceeds the hidden width"),
    (dict(dropout=1.0), "--dropout"),
    (dict(l2=-1.0), "--l2"),
    (dict(prune=1.5), "--prune"),
    (dict(method=Method.DENSE, compare_same_size=True), "--compare-same-size"),
])
def test_bad_settings_are_refused_with_the_option_named(treebank, tmp_path: Path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(treebank, tmp_path, **overrides)


def test_cli_errors_are_one_line(treebank, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["train", "parse", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "is not a folder" in missing.output
    untagged = tmp_path / "untagged.conllu"
    lines = [line.split("\t") for line in treebank["test"].read_text().splitlines()]
    untagged.write_text("\n".join("\t".join(c[:3] + ["_", "_"] + c[5:]) if len(c) == 10 else "\t".join(c)
                                  for c in lines) + "\n")
    train_parse(tiny(treebank, tmp_path / "run", method=Method.DENSE, epochs=1))
    result = runner.invoke(app, ["parse", str(tmp_path / "run"), str(untagged), "-o", str(tmp_path / "x.conllu")])
    assert result.exit_code == 2 and "has none" in result.output and not (tmp_path / "x.conllu").exists()
    no_data = runner.invoke(app, ["evaluate", str(tmp_path / "run")])
    assert no_data.exit_code == 2 and "--data" in no_data.output
    # a broken tree in dev: one line naming file and line, no run folder written
    lines = treebank["dev"].read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("1\t"))
    cols = lines[first].split("\t")
    lines[first] = "\t".join(cols[:6] + ["1"] + cols[7:])  # word 1 is its own head
    broken = tmp_path / "broken-dev.conllu"
    broken.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["train", "parse", "--train-file", str(treebank["train"]), "--dev-file", str(broken),
                                 "--test-file", str(treebank["test"]), "--out", str(tmp_path / "never")])
    assert result.exit_code == 2 and f"{broken}:{first + 1}" in result.output, result.output
    assert not (tmp_path / "never").exists()


def test_cli_train_parse_runs_and_prints_scores(treebank, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "train", "parse", "--train-file", str(treebank["train"]), "--dev-file", str(treebank["dev"]),
        "--test-file", str(treebank["test"]), "--hidden", "30", "--k", "5", "--dim", "8", "--epochs", "1",
        "--backend", "torch", "--no-progress", "--out", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    assert "test UAS" in result.output
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task"] == "parse" and saved["finished"]
    assert tuple(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["position"]) == (1, 0)

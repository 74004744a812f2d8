"""The command line through Typer's test runner: a short run and every kind of bad input."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mesimp_gpu.cli import app

runner = CliRunner()


def test_help_explains_every_option() -> None:
    result = runner.invoke(app, ["train", "mnist", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--method", "--k", "--hidden", "--layers", "--epochs", "--batch-size", "--optimizer", "--lr",
                   "--lazy", "--seed", "--device", "--backend", "--data-dir", "--out", "--limit", "--resume"):
        assert option in result.output, option


@pytest.mark.parametrize("extra", [[], ["--lazy", "--optimizer", "adagrad", "--lr", "0.1"]], ids=["plain", "lazy"])
def test_short_run_prints_test_accuracy(tmp_path: Path, mnist_dir: Path, extra) -> None:
    args = ["train", "mnist", "--method", "meprop", "--k", "5", "--hidden", "16", "--epochs", "1", "--limit", "300",
            "--chunks", "2", "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--no-progress", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    saved = json.loads((tmp_path / "results.json").read_text())
    assert f"{saved['final']['test_acc_at_best_dev']:.2f}%" in result.output
    assert saved["config"]["lazy"] == bool(extra)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "0"], "--k must be at least 1"),
        (["--hidden", "-5"], "--hidden must be at least 1"),
        (["--k", "900"], "exceeds the hidden width"),
        (["--device", "tpu"], "device"),
        (["--backend", "nope"], "unknown backend"),
    ],
)
def test_bad_values_get_one_line_errors(tmp_path: Path, args, message) -> None:
    result = runner.invoke(app, ["train", "mnist", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = runner.invoke(app, ["train", "mnist", "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "MNIST not found" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("method", ["dense", "meprop", "unified", "mesimp"])
def test_a_diverging_run_stops_with_the_same_clear_error_for_every_method(tmp_path: Path, mnist_dir: Path,
                                                                          method: str) -> None:
    result = runner.invoke(app, ["train", "mnist", "--method", method, "--k", "5", "--hidden", "16", "--optimizer",
                                 "sgd", "--lr", "1e12", "--clip", "0", "--limit", "300", "--epochs", "1",
                                 "--no-progress", "--backend", "torch", "--data-dir", str(mnist_dir),
                                 "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "training diverged at update step" in result.output and "--lr" in result.output
    assert "Traceback" not in result.output

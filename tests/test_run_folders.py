"""What a run leaves behind, through the CLI runner: a folder of its own, no silent overwrite, a resumable
Ctrl-C, ordinary file permissions, and one-line messages naming the option at fault."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mesimp_gpu.cli import app
from mesimp_gpu.io import write_json
from mesimp_gpu.models.mlp import load_mlp
from mesimp_gpu.train.mnist import MnistTrainer
from mesimp_gpu.train.run_folder import clear_run, holds_run, new_run_folder, prepare_run_folder
from mesimp_gpu.train.trainer import Trainer

runner = CliRunner()


def quick_mnist(mnist_dir: Path, *extra: str) -> list[str]:
    """A seconds-long MNIST run (2 pieces) with ``extra`` options."""
    return ["train", "mnist", "--method", "mesimp", "--k", "5", "--hidden", "16", "--epochs", "2", "--cycle", "1",
            "--limit", "300", "--chunks", "2", "--no-progress", "--backend", "torch", "--threads", "1",
            "--data-dir", str(mnist_dir), *extra]


def test_runs_without_out_get_folders_of_their_own(tmp_path: Path, mnist_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    mnist_dir = mnist_dir.resolve()  # it may be relative to where the tests started
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        result = runner.invoke(app, quick_mnist(mnist_dir, "--epochs", "1"))
        assert result.exit_code == 0, result.output
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("mnist-") and holds_run(f) for f in folders)
    assert f"runs/{folders[-1].name}/results.json" in result.output


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "run"
    assert runner.invoke(app, quick_mnist(mnist_dir, "--out", str(out))).exit_code == 0
    before = (out / "results.json").read_text()
    refused = runner.invoke(app, quick_mnist(mnist_dir, "--out", str(out), "--method", "dense"))
    assert refused.exit_code == 2 and "already holds a run" in refused.output and "--overwrite" in refused.output
    assert (out / "results.json").read_text() == before, "a refused run must not touch the old one"

    (out / "notes.txt").write_text("mine")  # not a run file: kept
    replaced = runner.invoke(app, quick_mnist(mnist_dir, "--out", str(out), "--method", "dense", "--overwrite"))
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "hidden_sizes.png").exists(), "the meSimp run's plots must not survive its replacement"
    assert '"method": "dense"' in (out / "results.json").read_text() and (out / "notes.txt").is_file()

    both = runner.invoke(app, quick_mnist(mnist_dir, "--out", str(out), "--resume", "--overwrite"))
    assert both.exit_code == 2 and "give one of them" in both.output
    nowhere = runner.invoke(app, quick_mnist(mnist_dir, "--resume"))
    assert nowhere.exit_code == 2 and "--resume needs --out" in nowhere.output


def test_ctrl_c_keeps_a_checkpoint_and_prints_the_command_that_resumes(
    tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    finish_piece = Trainer.end_piece

    def interrupted_after_first_piece(self: Trainer, epoch: int, chunk: int, pieces: int) -> None:
        finish_piece(self, epoch, chunk, pieces)
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(Trainer, "end_piece", interrupted_after_first_piece)
        stopped = runner.invoke(app, quick_mnist(mnist_dir, "--out", str(out), "--optimizer", "adagrad"))
    assert stopped.exit_code == 130
    assert "interrupted" in stopped.output and "Traceback" not in stopped.output
    command = next(line for line in stopped.output.splitlines() if line.strip().startswith("mesimp-gpu "))
    words = shlex.split(command)
    assert words[:3] == ["mesimp-gpu", "train", "mnist"] and "--resume" in words
    assert words[words.index("--optimizer") + 1] == "adagrad" and words[words.index("--out") + 1] == str(out)

    resumed = runner.invoke(app, words[1:])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "epoch 1, piece 2" in resumed.output


def test_interrupt_before_any_checkpoint_says_so(tmp_path: Path, mnist_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: Trainer, *args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(MnistTrainer, "train_piece", interrupted)
    result = runner.invoke(app, quick_mnist(mnist_dir, "--out", str(tmp_path / "run")))
    assert result.exit_code == 130 and "nothing to resume" in result.output


def test_limit_is_named_in_the_help_and_in_the_result_line(tmp_path: Path, mnist_dir: Path) -> None:
    help_text = runner.invoke(app, ["train", "mnist", "--help"], env={"COLUMNS": "200"}).output
    assert "max(N // 10, 100)" in help_text
    result = runner.invoke(app, quick_mnist(mnist_dir, "--epochs", "1", "--out", str(tmp_path / "run")))
    assert "--limit 300: scored on the first 100 dev and test images only" in result.output


@pytest.mark.parametrize("command", [["train", "mnist"], ["train", "pos"], ["train", "parse"], ["bench"]])
def test_help_shows_no_placeholder_after_flags(command: list[str]) -> None:
    help_text = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
    assert "--progress" in help_text or "--quick" in help_text
    assert "<bool>" not in help_text


def test_result_files_get_ordinary_permissions(tmp_path: Path) -> None:
    mask = os.umask(0o027)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--clip", "inf"], "--clip must be a positive number"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder is not a folder"),
    ],
)
def test_messages_name_the_option(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["train", "mnist", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_bench_threads_mean_the_same_as_for_train(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "--threads", "0", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--threads must be at least 1" in result.output


def test_run_folder_rules(tmp_path: Path) -> None:
    first = new_run_folder("pos", root=tmp_path)
    first.mkdir()
    assert new_run_folder("pos", root=tmp_path) != first
    run = tmp_path / "run"
    write_json(run / "results.json", {})
    (run / "same-size").mkdir()
    write_json(run / "same-size" / "results.json", {})
    (run / "curves.png").write_bytes(b"png")
    with pytest.raises(ValueError, match="is a file"):
        prepare_run_folder(run / "curves.png", "mnist", resume=False, overwrite=False)
    assert prepare_run_folder(run, "mnist", resume=True, overwrite=False) == run and holds_run(run)
    clear_run(run)
    assert not any(run.iterdir())


def test_a_run_keeps_its_final_network_beside_the_best_dev_one(tmp_path: Path, mnist_dir: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, quick_mnist(mnist_dir, "--out", str(out), "--epochs", "1"))
    assert result.exit_code == 0, result.output
    final = json.loads((out / "results.json").read_text())["final"]
    assert load_mlp(out / "final").sizes == final["sizes"]
    assert load_mlp(out).sizes == final["sizes_at_best_dev"]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    for name, value in load_mlp(out / "final").state_dict().items():
        if name in checkpoint:
            assert torch.equal(value, checkpoint[name]), name
    scored = runner.invoke(app, ["evaluate", str(out / "final"), "--data-dir", str(mnist_dir)])
    assert scored.exit_code == 0 and "test accuracy" in scored.output

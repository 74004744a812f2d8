"""``mesimp-gpu reproduce``: the quick table through the command line, reuse of finished runs, and
the table's rows from results documents."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mesimp_gpu.cli import app
from mesimp_gpu.train.reproduce import ReproduceConfig, Task, markdown_table

runner = CliRunner()


def test_quick_mnist_through_the_cli_then_reused(tmp_path: Path, mnist_dir: Path) -> None:
    args = ["reproduce", "--quick", "--task", "mnist", "--limit", "300", "--data-dir", str(mnist_dir),
            "--out", str(tmp_path), "--threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    table = (tmp_path / "table.md").read_text()
    assert table in result.output
    row = next(line for line in table.splitlines() if line.startswith("| mnist"))
    dense = json.loads((tmp_path / "mnist-dense" / "results.json").read_text())
    mesimp = json.loads((tmp_path / "mnist-mesimp" / "results.json").read_text())
    assert dense["config"]["method"] == "dense" and mesimp["config"]["method"] == "mesimp"
    assert mesimp["config"]["limit"] == 300 and mesimp["config"]["epochs"] == 2 and "same_size" in mesimp
    final = mesimp["final"]
    assert f"{dense['final']['test_acc_at_best_dev']:.2f} (98.20)" in row
    assert f"{final['test_acc_at_best_dev']:.2f} at {'-'.join(map(str, final['sizes_at_best_dev'][1:-1]))}" in row
    assert f"{final['test_acc_final_network']:.2f}" in row and "(154)" in row
    assert "--quick" in table
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    reused = json.loads((tmp_path / "mnist-mesimp" / "results.json").read_text())
    assert reused["wall_seconds"] == mesimp["wall_seconds"], "a finished run is reused, not trained again"


def test_quick_pos_and_parse_through_the_cli(tmp_path: Path, ud_dir: Path) -> None:
    args = ["reproduce", "--quick", "--task", "pos", "--task", "parse", "--limit", "40", "--treebank-dir",
            str(ud_dir), "--out", str(tmp_path), "--threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| p")]
    assert [row.split(" ")[1] for row in rows] == ["pos", "parse"]
    for task in ("pos", "parse"):
        mesimp = json.loads((tmp_path / f"{task}-mesimp" / "results.json").read_text())
        assert mesimp["finished"] and "same_size" in mesimp and mesimp["config"]["limit"] == 40
        assert mesimp["final"]["test_acc_final_network"] is not None


def test_a_folder_with_other_settings_is_refused(tmp_path: Path, mnist_dir: Path) -> None:
    args = ["reproduce", "--quick", "--task", "mnist", "--data-dir", str(mnist_dir), "--out", str(tmp_path)]
    (tmp_path / "mnist-dense").mkdir(parents=True)
    (tmp_path / "mnist-dense" / "results.json").write_text(json.dumps({"config": {"method": "dense"}}))
    result = runner.invoke(app, [*args, "--limit", "300"])
    assert result.exit_code == 2 and "holds a run with other settings" in result.output


@pytest.mark.parametrize("args, message", [
    (["--task", "pos"], "pos and parse need --treebank-dir"),
    (["--task", "bogus"], "bogus"),
    (["--limit", "0", "--task", "mnist"], "--limit must be at least 1"),
])
def test_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["reproduce", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_table_rows_name_both_networks() -> None:
    def results(test: float, sizes: list[int], at_best: list[int], end: float | None) -> dict:
        return {"final": {"test_acc_at_best_dev": test, "sizes": sizes, "sizes_at_best_dev": at_best,
                          "test_acc_final_network": end}, "epoch_seconds": [{"epoch": 0, "forward": 1.0,
                                                                             "backward": 2.0, "update": 3.0}]}
    dense = results(98.25, [784, 500, 500, 10], [784, 500, 500, 10], 98.1)
    mesimp = results(98.08, [784, 142, 135, 10], [784, 150, 146, 10], 97.96)
    mesimp["same_size"] = {"test_acc_at_best_dev": 97.99}
    table = markdown_table([(Task.MNIST, dense, mesimp)])
    row = table.splitlines()[2]
    assert row == ("| mnist (test accuracy) | 98.25 (98.20) | 98.08 at 150-146 (98.31) | 142-135 = 138.5 (154) "
                   "| 97.96 | 97.99 | 6 / 6 |")
    assert ReproduceConfig(tasks=(Task.MNIST, Task.MNIST)).tasks == (Task.MNIST,)

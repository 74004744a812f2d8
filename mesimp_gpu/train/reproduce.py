"""``mesimp-gpu reproduce``: the seed papers' meSimp table, run again for every task the project has.

For each task two runs at the papers' settings: dense back propagation, and meSimp with its dense
baseline of the final size trained from scratch. One markdown table (``table.md``) puts the results
beside the meSimp README's numbers: dense accuracy, meSimp's accuracy at the best dev score with the
size of that network, the size of the network at the end and its accuracy, the same-size baseline, and
the training time. ``quick`` runs every task on a small subset for one or two epochs: minutes, for
trying the command, not for the numbers.

Each run writes its own folder (``<out>/<task>-dense``, ``<out>/<task>-mesimp``); a run whose folder
already holds finished results with the same settings is not run again, so an interrupted
reproduction continues where it stopped.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesimp_gpu.io import write_bytes, write_json
from mesimp_gpu.lstm import GateSelection
from mesimp_gpu.optim import OptimizerName
from mesimp_gpu.train.mnist import Preset as MnistPreset
from mesimp_gpu.train.mnist import mnist_config, train_mnist
from mesimp_gpu.train.parse import parse_config, train_parse
from mesimp_gpu.train.pos import pos_config, train_pos
from mesimp_gpu.train.records import jsonable
from mesimp_gpu.train.settings import Method


class Task(str, enum.Enum):
    """The tasks of the seed's table."""

    MNIST = "mnist"
    POS = "pos"
    PARSE = "parse"


#: the meSimp README's table (Adam, CPU; POS and parsing on the Penn Treebank WSJ): dense accuracy,
#: meSimp accuracy, kept dimension of 500
SEED_NUMBERS: dict[Task, dict[str, float]] = {
    Task.MNIST: {"dense": 98.20, "mesimp": 98.31, "kept": 154},
    Task.POS: {"dense": 97.22, "mesimp": 97.25, "kept": 60},
    Task.PARSE: {"dense": 89.80, "mesimp": 90.11, "kept": 51},
}

#: what each task's score is
METRIC = {Task.MNIST: "test accuracy", Task.POS: "test tag accuracy (XPOS)", Task.PARSE: "test UAS"}


@dataclass(frozen=True)
class ReproduceConfig:
    """Every setting of ``mesimp-gpu reproduce``; the CLI options mirror these fields."""

    tasks: tuple[Task, ...] = (Task.MNIST, Task.POS, Task.PARSE)  # which rows to run
    quick: bool = False  # a few minutes in all: small subsets, one or two epochs
    out: str = "runs/reproduce"  # folder for the table and one folder per run
    mnist_dir: str | None = None  # MNIST folder; default: MESIMP_DATA_DIR, cache, download
    treebank_dir: str | None = None  # folder with *train/*dev/*test.conllu[.gz] (UD English EWT) for pos and parse
    device: str = "cpu"  # cpu, cuda or cuda:N
    threads: int | None = None  # torch CPU threads; None keeps torch's default
    seed: int = 1  # every run's seed
    limit: int | None = None  # train on the first N examples (sentences) of each task; --quick: 5000 / 300

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        tasks = tuple(Task(t) for t in self.tasks)
        if not tasks:
            raise ValueError("--task: name at least one of mnist, pos, parse")
        object.__setattr__(self, "tasks", tuple(dict.fromkeys(tasks)))
        if any(t is not Task.MNIST for t in self.tasks) and self.treebank_dir is None:
            raise ValueError("pos and parse need --treebank-dir, a folder with *train, *dev and *test.conllu[.gz] "
                             "(UD English EWT); or run --task mnist only")


def _mnist(config: ReproduceConfig, method: Method, out: Path) -> Any:
    quick = dict(limit=config.limit or 5000, epochs=2, cycle=1, chunks=4) if config.quick else {"limit": config.limit}
    extra = {"compare_same_size": True} if method is Method.MESIMP else {}
    return mnist_config(MnistPreset.PAPER, method=method, data_dir=config.mnist_dir, out=str(out), seed=config.seed,
                        device=config.device, threads=config.threads, progress=False, **quick, **extra)


def _pos(config: ReproduceConfig, method: Method, out: Path) -> Any:
    # the settings of bench/results/pos: the paper's tagger, 3 epochs at Adam 0.005
    quick = dict(limit=config.limit or 300, epochs=1, chunks=2) if config.quick else {"limit": config.limit}
    extra = dict(compare_same_size=True, k=5, selection=GateSelection.PER_GATE) if method is Method.MESIMP else {}
    settings = dict(method=method, epochs=3, lr=0.005, data_dir=config.treebank_dir, out=str(out),
                    seed=config.seed, device=config.device, threads=config.threads, progress=False)
    return pos_config(None, **{**settings, **quick, **extra})


def _parse(config: ReproduceConfig, method: Method, out: Path) -> Any:
    # the settings of bench/results/parse: the papers' parser (500 cube units, k 20), Adam, 8 epochs
    quick = dict(limit=config.limit or 300, epochs=2) if config.quick else {"limit": config.limit}
    extra = {"compare_same_size": True} if method is Method.MESIMP else {}
    settings = dict(method=method, k=20, epochs=8, batch_size=1000, optimizer=OptimizerName.ADAM, lr=1e-3, chunks=2, cycle=1,
                    data_dir=config.treebank_dir, out=str(out), seed=config.seed, device=config.device,
                    threads=config.threads, progress=False)
    return parse_config(None, **{**settings, **quick, **extra})


#: task -> (the config of a run, the function that trains it)
RUNS: dict[Task, tuple[Callable[[ReproduceConfig, Method, Path], Any], Callable[..., dict[str, Any]]]] = {
    Task.MNIST: (_mnist, train_mnist),
    Task.POS: (_pos, train_pos),
    Task.PARSE: (_parse, train_parse),
}


def run_or_reuse(config: Any, train: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Train ``config`` into its folder, or return the finished results already there (same settings);
    ValueError when the folder holds a run made with other settings."""
    path = Path(config.out) / "results.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("config") != jsonable(config):
            raise ValueError(f"{path.parent} holds a run with other settings; choose another --out")
        if saved.get("finished") and ("same_size" in saved or not getattr(config, "compare_same_size", False)):
            return saved
    start = time.perf_counter()
    results = train(config, resume=(Path(config.out) / "checkpoint.pt").is_file())
    results["wall_seconds"] = time.perf_counter() - start
    write_json(path, results)
    return results


def training_seconds(results: dict[str, Any]) -> float:
    """Seconds of training (forward, backward, update) over all epochs of a results document."""
    return sum(v for epoch in results["epoch_seconds"] for k, v in epoch.items() if k != "epoch")


def hidden(sizes: Sequence[int] | None) -> str:
    """``[784, 150, 146, 10]`` -> ``"150-146"``."""
    return "-".join(map(str, sizes[1:-1])) if sizes else "?"


def mean_hidden(sizes: Sequence[int]) -> float:
    return sum(sizes[1:-1]) / len(sizes[1:-1])


def table_row(task: Task, dense: dict[str, Any], mesimp: dict[str, Any]) -> str:
    """One markdown row: the seed's number in brackets after each of ours."""
    seed, d, m = SEED_NUMBERS[task], dense["final"], mesimp["final"]
    same = mesimp.get("same_size")
    end = m.get("test_acc_final_network")
    cells = [
        f"{task.value} ({METRIC[task]})",
        f"{d['test_acc_at_best_dev']:.2f} ({seed['dense']:.2f})",
        f"{m['test_acc_at_best_dev']:.2f} at {hidden(m.get('sizes_at_best_dev'))} ({seed['mesimp']:.2f})",
        f"{hidden(m['sizes'])} = {mean_hidden(m['sizes']):.1f} ({seed['kept']:.0f})",
        f"{end:.2f}" if end is not None else "-",
        f"{same['test_acc_at_best_dev']:.2f}" if same else "-",
        f"{training_seconds(dense):.0f} / {training_seconds(mesimp):.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_HEAD = (
    "| task (score) | dense (seed) | meSimp at best dev, at hidden (seed) | final hidden = mean (seed) "
    "| final network | dense of the final size | training s dense / meSimp |\n"
    "|---|---|---|---|---|---|---|"
)


def markdown_table(rows: Sequence[tuple[Task, dict[str, Any], dict[str, Any]]], note: str = "") -> str:
    """The table for ``(task, dense results, meSimp results)`` rows, with a line on what the brackets hold."""
    lines = [TABLE_HEAD, *(table_row(*row) for row in rows), "",
             "In brackets: the meSimp README's numbers (Adam, CPU; POS and parsing on the Penn Treebank WSJ, here "
             "UD English EWT). Scores are test scores; `final network` is the network the meSimp run ends with."]
    if note:
        lines.append(note)
    return "\n".join(lines) + "\n"


def reproduce(config: ReproduceConfig) -> Path:
    """Run (or reuse) every task's dense and meSimp runs and write ``table.md``; returns its path."""
    out = Path(config.out)
    rows = []
    for task in config.tasks:
        make, train = RUNS[task]
        results = [run_or_reuse(make(config, method, out / f"{task.value}-{method.value}"), train)
                   for method in (Method.DENSE, Method.MESIMP)]
        rows.append((task, *results))
        write_bytes(out / "table.md", markdown_table(rows, _note(config)).encode())
    return out / "table.md"


def _note(config: ReproduceConfig) -> str:
    if config.quick:
        return "`--quick`: small subsets and one or two epochs, for trying the command; the numbers mean little."
    return ""

"""``mesimp-gpu reproduce``: the options mirror :class:`~mesimp_gpu.train.reproduce.ReproduceConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mesimp_gpu.cli.errors import user_errors
from mesimp_gpu.cli.options import device_option, threads_option
from mesimp_gpu.train.reproduce import ReproduceConfig, Task
from mesimp_gpu.train.run_folder import new_run_folder


def reproduce_command(
    task: Optional[list[Task]] = typer.Option(None, help="A row of the table to run (repeat the option for "
                                              "several); default: mnist, pos and parse."),
    quick: bool = typer.Option(False, help="A few minutes in all: small subsets, one or two epochs (for trying "
                               "the command; the numbers mean little)."),
    out: Optional[Path] = typer.Option(None, help="Folder for table.md and one folder per run; runs already "
                                       "finished there are reused. Default: a new runs/reproduce-<date>-<time>."),
    data_dir: Optional[Path] = typer.Option(None, help="MNIST folder (the four IDX files). Default: "
                                            "$MESIMP_DATA_DIR, then the cache, then download."),
    treebank_dir: Optional[Path] = typer.Option(None, help="pos and parse: a folder with *train, *dev and "
                                                "*test.conllu[.gz] (UD English EWT)."),
    device: str = device_option("cpu"),
    threads: Optional[int] = threads_option(None),
    seed: int = typer.Option(1, help="Every run's seed."),
    limit: Optional[int] = typer.Option(None, help="Train on the first N images (sentences) of each task "
                                        "(--quick: 5000 images, 300 sentences)."),
) -> None:
    """Run the seed papers' meSimp table (dense, meSimp at the best dev, the final network and its size, the
    same-size dense baseline, time) for every task and write it as markdown beside the papers' numbers."""
    from mesimp_gpu.train.reproduce import reproduce

    with user_errors():
        config = ReproduceConfig(
            tasks=tuple(task) if task else tuple(Task), quick=quick, out=str(out or new_run_folder("reproduce")),
            mnist_dir=str(data_dir) if data_dir else None, treebank_dir=str(treebank_dir) if treebank_dir else None,
            device=device, threads=threads, seed=seed, limit=limit,
        )
        table = reproduce(config)
    typer.echo(table.read_text())
    typer.echo(f"table in {table}")

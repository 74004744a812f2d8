"""The ``mesimp-gpu`` command line (Typer): one module per command family, each command's options
mirroring one config dataclass; the work itself lives in the modules the commands call."""

from __future__ import annotations

import logging

import typer

from mesimp_gpu.cli.bench import bench_command
from mesimp_gpu.cli.check import check_command
from mesimp_gpu.cli.evaluate import evaluate_command
from mesimp_gpu.cli.inference import parse_command, tag_command
from mesimp_gpu.cli.reproduce import reproduce_command
from mesimp_gpu.cli.train import train_app

app = typer.Typer(help="meProp (sparsified back propagation) and meSimp (model simplification).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(train_app, name="train")
app.command("evaluate")(evaluate_command)
app.command("tag")(tag_command)
app.command("parse")(parse_command)
app.command("bench")(bench_command)
app.command("check")(check_command)
app.command("reproduce")(reproduce_command)


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    app()

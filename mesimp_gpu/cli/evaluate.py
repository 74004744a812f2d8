"""``mesimp-gpu evaluate``: the options mirror :class:`~mesimp_gpu.train.evaluate.EvaluateConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mesimp_gpu.cli.errors import user_errors
from mesimp_gpu.cli.options import device_option
from mesimp_gpu.train.evaluate import EvaluateConfig, evaluate_mnist


def evaluate_command(
    model: Path = typer.Argument(..., help="A model.json written by a training run (or its folder)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with the four MNIST IDX files. Default: "
                                            "$MESIMP_DATA_DIR, then the cache, then download."),
    device: str = device_option(EvaluateConfig.__dataclass_fields__["device"].default),
) -> None:
    """Score a saved MNIST model (dense or meSimp-shrunk) on the 10,000 test images."""
    with user_errors():
        scores = evaluate_mnist(EvaluateConfig(str(model), str(data_dir) if data_dir else None, device))
    typer.echo(f"test accuracy {scores['test_acc']:.2f}% on {scores['images']} images | sizes "
               f"{'-'.join(map(str, scores['sizes']))} | {scores['parameters']:,} parameters")

"""``mesimp-gpu evaluate``: the options mirror :class:`~mesimp_gpu.train.evaluate.EvaluateConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mesimp_gpu.cli.errors import user_errors
from mesimp_gpu.cli.options import device_option, field_default
from mesimp_gpu.models.mlp import MLP_FORMAT
from mesimp_gpu.models.tagger import TAGGER_FORMAT
from mesimp_gpu.train.evaluate import EvaluateConfig, evaluate


def evaluate_command(
    model: Path = typer.Argument(..., help="A run folder (or its model.json) written by a training run."),
    data: Optional[Path] = typer.Option(None, help="Tagger or parser: a CoNLL-U file with gold tags or trees to score "
                                        "on."),
    data_dir: Optional[Path] = typer.Option(None, help="MNIST model: folder with the four MNIST IDX files. Default: "
                                            "$MESIMP_DATA_DIR, then the cache, then download."),
    device: str = device_option(field_default(EvaluateConfig, "device")),
) -> None:
    """Score a saved model: an MNIST MLP (dense or meSimp-shrunk) on the 10,000 test images, a tagger or a parser
    on --data."""
    with user_errors():
        config = EvaluateConfig(str(model), str(data) if data else None, str(data_dir) if data_dir else None, device)
        kind, scores = evaluate(config)
    if kind == MLP_FORMAT:
        typer.echo(f"test accuracy {scores['test_acc']:.2f}% on {scores['images']} images | sizes "
                   f"{'-'.join(map(str, scores['sizes']))} | {scores['parameters']:,} parameters")
        return
    if kind == TAGGER_FORMAT:
        typer.echo(f"{scores['column']} accuracy {scores['accuracy']:.2f}% on {scores['tokens']} tokens | hidden "
                   f"{'-'.join(map(str, scores['hidden']))} | {scores['tokens_per_second']:.0f} tokens/s")
        return
    typer.echo(f"UAS {scores['uas']:.2f} LAS {scores['las']:.2f} (without punctuation: UAS {scores['uas_no_punct']:.2f} "
               f"LAS {scores['las_no_punct']:.2f}) on {scores['sentences']} sentences, {scores['words']} words | "
               f"hidden {scores['hidden']} | {scores['sentences_per_second']:.0f} sentences/s")

"""``mesimp-gpu parse``: apply a saved model to a CoNLL-U file; options mirror
:class:`~mesimp_gpu.train.inference.ParseFileConfig`."""

from __future__ import annotations

from pathlib import Path

import typer

from mesimp_gpu.cli.errors import user_errors
from mesimp_gpu.cli.options import device_option
from mesimp_gpu.train.inference import ParseFileConfig, parse_file

_PARSE_FILE = ParseFileConfig.__dataclass_fields__


def parse_command(
    model: Path = typer.Argument(..., help="A run folder of `train parse` (or its model.json)."),
    input: Path = typer.Argument(..., help="CoNLL-U file to parse (plain or gzip); its FORM and tag columns are read."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the copy with predicted HEAD and DEPREL "
                                "(every other column and comment unchanged)."),
    device: str = device_option(_PARSE_FILE["device"].default),
    batch_size: int = typer.Option(_PARSE_FILE["batch_size"].default, help="Sentences parsed together."),
) -> None:
    """Parse a CoNLL-U file with a saved parser; prints sentences per second."""
    with user_errors():
        stats = parse_file(ParseFileConfig(str(model), str(input), str(output), device, batch_size))
    typer.echo(f"parsed {stats['sentences']} sentences ({stats['words']} words) in {stats['seconds']:.2f} s: "
               f"{stats['sentences_per_second']:.0f} sentences/s | wrote {output}")

"""``mesimp-gpu tag`` and ``mesimp-gpu parse``: apply a saved model to a CoNLL-U file; the options mirror
:class:`~mesimp_gpu.train.inference.ApplyConfig`."""

from __future__ import annotations

from pathlib import Path

import typer

from mesimp_gpu.cli.errors import user_errors
from mesimp_gpu.cli.options import device_option, field_default
from mesimp_gpu.train.inference import DECODE_BATCH, TAG_BATCH, ApplyConfig, parse_file, tag_file


def output_option() -> typer.models.OptionInfo:
    return typer.Option(..., "--output", "-o", help="Where to write the annotated copy (every other column, comment "
                        "and line unchanged).")


def tag_command(
    model: Path = typer.Argument(..., help="A run folder of `train pos` (or its model.json)."),
    input: Path = typer.Argument(..., help="CoNLL-U file to tag (plain or gzip); its FORM column is read."),
    output: Path = output_option(),
    device: str = device_option(field_default(ApplyConfig, "device")),
    batch_size: int = typer.Option(TAG_BATCH, help="Sentences tagged together."),
) -> None:
    """Tag a CoNLL-U file with a saved tagger (into the XPOS or UPOS column it was trained on); prints tokens/s."""
    with user_errors():
        stats = tag_file(ApplyConfig(str(model), str(input), str(output), device, batch_size))
    typer.echo(f"tagged {stats['tokens']} tokens ({stats['sentences']} sentences) in {stats['seconds']:.2f} s: "
               f"{stats['tokens_per_second']:.0f} tokens/s | {stats['column']} written to {output}")


def parse_command(
    model: Path = typer.Argument(..., help="A run folder of `train parse` (or its model.json)."),
    input: Path = typer.Argument(..., help="CoNLL-U file to parse (plain or gzip); its FORM and tag columns are read."),
    output: Path = output_option(),
    device: str = device_option(field_default(ApplyConfig, "device")),
    batch_size: int = typer.Option(DECODE_BATCH, help="Sentences parsed together."),
) -> None:
    """Parse a CoNLL-U file with a saved parser (predicted HEAD and DEPREL); prints sentences per second."""
    with user_errors():
        stats = parse_file(ApplyConfig(str(model), str(input), str(output), device, batch_size))
    typer.echo(f"parsed {stats['sentences']} sentences ({stats['words']} words) in {stats['seconds']:.2f} s: "
               f"{stats['sentences_per_second']:.0f} sentences/s | wrote {output}")

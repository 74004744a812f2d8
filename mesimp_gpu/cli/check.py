"""``mesimp-gpu check``: every backend on a device against the float64 reference
(:mod:`mesimp_gpu.backends.check`)."""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from mesimp_gpu.cli.errors import user_errors
from mesimp_gpu.cli.options import device_option


def check_command(
    device: str = device_option("cpu"),
    seed: Optional[int] = typer.Option(None, help="Seed of the inputs (default: a fresh one, printed, so that a "
                                       "failure can be replayed)."),
    out: Optional[Path] = typer.Option(None, help="Also write the results, with the machine, to this JSON file."),
) -> None:
    """Check every backend that runs on --device against the float64 reference: selections identical, products and
    optimizer row updates within tolerance, on fresh random inputs (one row, odd widths, k = 1, k = n, ties, zeros,
    subnormals). Prints a table; exits 1 when any check fails. Seconds on a CPU; run it first on a new machine."""
    from mesimp_gpu.backends.check import render_table, run_checks
    from mesimp_gpu.io import write_json
    from mesimp_gpu.machine import describe
    from mesimp_gpu.train.settings import resolve_device

    with user_errors():
        torch_device = resolve_device(device)
        seed = random.randrange(2**31) if seed is None else seed
        typer.echo(f"checking the backends on {torch_device} against the reference (seed {seed})", err=True)
        results, skipped = run_checks(torch_device, seed, log=lambda line: typer.echo(line, err=True))
    typer.echo(render_table(results, skipped))
    if out is not None:
        write_json(out, {"device": str(torch_device), "seed": seed, "machine": describe(torch_device),
                         "results": [asdict(r) for r in results], "not_checked": skipped})
    failed = [r for r in results if not r.passed]
    if not results:
        typer.echo("error: no backend runs on this device", err=True)
        raise typer.Exit(code=1)
    if failed:
        typer.echo(f"{len(failed)} of {len(results)} checks FAILED (replay with --seed {seed})", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"all {len(results)} checks passed", err=True)

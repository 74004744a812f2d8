"""How the command line reports what the user must fix: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from mesimp_gpu.backends import BACKEND_NAMES, BackendUnavailable, InvalidGradientError
from mesimp_gpu.data.conllu import ConlluFormatError
from mesimp_gpu.data.idx import IdxFormatError

#: errors that are the user's to fix: printed as one line, exit code 2
USER_ERRORS = (ValueError, FileNotFoundError, BackendUnavailable, InvalidGradientError, IdxFormatError,
               ConlluFormatError)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user-fixable error into ``error: ...`` on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except USER_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


def check_backend(name: str) -> str:
    """Typer callback: reject unknown backend names before any work starts."""
    if name not in BACKEND_NAMES:
        raise typer.BadParameter(f"unknown backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)}")
    return name


def given_options(ctx: typer.Context) -> set[str]:
    """Names of the parameters set on the command line or through the environment, not left at their default."""
    # compared by name: Typer may vendor click, so its ParameterSource enum has no portable import
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"}

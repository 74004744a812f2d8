"""How the command line reports what the user must fix: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from mesimp_gpu.backends import BACKEND_NAMES, BackendUnavailable, InvalidGradientError, is_backend_name
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
    if not is_backend_name(name):
        raise typer.BadParameter(f"unknown backend {name!r}; choose one of: {', '.join(BACKEND_NAMES)} "
                                 "(cpu@LEVEL: the cpu backend built for one instruction-set level)")
    return name


def given_options(ctx: typer.Context) -> set[str]:
    """Names of the parameters set on the command line or through the environment, not left at their default."""
    # compared by name: Typer may vendor click, so its ParameterSource enum has no portable import
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"}


def command_words(ctx: typer.Context, replace: dict[str, object]) -> list[str]:
    """The command that ``ctx`` runs, rebuilt from the options given (``replace`` overrides or adds options by
    parameter name; True adds a flag), starting with ``mesimp-gpu``."""
    words = ["mesimp-gpu", *ctx.command_path.split()[1:]]
    given = given_options(ctx)
    values = {name: ctx.params[name] for name in ctx.params if name in given}
    values.update(replace)
    for param in ctx.command.params:
        if param.name not in values or not param.opts:
            continue
        value = values[param.name]
        if getattr(param, "is_flag", False):
            chosen = param.opts[0] if value else (param.secondary_opts or [None])[0]
            if chosen is not None:
                words.append(chosen)
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            words += [param.opts[0], str(getattr(item, "value", item))]
    return words


@contextmanager
def resumable(ctx: typer.Context, out: Path) -> Iterator[None]:
    """On Ctrl-C, say what was kept and print the command that continues the run; exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        if (out / "checkpoint.pt").is_file():
            again = shlex.join(command_words(ctx, {"out": out, "resume": True, "overwrite": False}))
            typer.echo(f"\ninterrupted: {out / 'checkpoint.pt'} holds the run up to its last finished piece; "
                       f"continue with:\n  {again}", err=True)
        else:
            typer.echo("\ninterrupted before the first checkpoint; nothing to resume", err=True)
        raise typer.Exit(code=130) from None

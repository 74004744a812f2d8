"""The ``mesimp-gpu`` command line (Typer). Each command's options mirror one config dataclass;
the work itself lives in the modules the commands call."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from mesimp_gpu.backends import BACKEND_NAMES, BackendUnavailable, InvalidGradientError
from mesimp_gpu.data.idx import IdxFormatError
from mesimp_gpu.optim import OptimizerName
from mesimp_gpu.train.mnist import Method, MnistConfig
from mesimp_gpu.train.pos import pos_command

app = typer.Typer(help="meProp (sparsified back propagation) and meSimp (model simplification).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
train_app = typer.Typer(help="Train a model.", no_args_is_help=True)
app.add_typer(train_app, name="train")

#: errors that are the user's to fix: printed as one line, exit code 2
USER_ERRORS = (ValueError, FileNotFoundError, BackendUnavailable, InvalidGradientError, IdxFormatError)


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


_DEFAULT = MnistConfig()


@train_app.command("mnist")
def train_mnist_command(
    method: Method = typer.Option(_DEFAULT.method, help="dense: full back propagation; meprop: per-example "
                                  "top-k (the paper); unified: one top-k set per minibatch; random: k random columns."),
    k: int = typer.Option(_DEFAULT.k, help="Gradient entries kept per example in every hidden layer."),
    hidden: int = typer.Option(_DEFAULT.hidden, help="Width of each hidden layer."),
    layers: int = typer.Option(_DEFAULT.layers, help="Number of hidden layers."),
    epochs: int = typer.Option(_DEFAULT.epochs, help="Passes over the 55,000 training images (the reference: 20)."),
    batch_size: int = typer.Option(_DEFAULT.batch_size, help="Examples per update step."),
    optimizer: OptimizerName = typer.Option(_DEFAULT.optimizer, help="Update rule (Adam 0.9/0.999/1e-8, AdaGrad eps 1e-6, SGD)."),
    lr: float = typer.Option(_DEFAULT.lr, help="Learning rate."),
    clip: float = typer.Option(_DEFAULT.clip, help="Element-wise gradient clipping bound; 0 disables."),
    grad_sum: bool = typer.Option(_DEFAULT.grad_sum, "--grad-sum/--grad-mean",
                                  help="Sum the loss over the minibatch (the reference) or average it."),
    chunks: int = typer.Option(_DEFAULT.chunks, help="Dev evaluations per epoch; test is scored when dev improves."),
    seed: int = typer.Option(_DEFAULT.seed, help="Random seed: same seed, same run."),
    device: str = typer.Option(_DEFAULT.device, help="cpu, cuda or cuda:N."),
    backend: str = typer.Option(_DEFAULT.backend, callback=check_backend,
                                help=f"meProp kernels: {', '.join(BACKEND_NAMES)}."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with the four MNIST IDX files (raw or .gz). Default: "
                                            "$MESIMP_DATA_DIR, then the cache, then download."),
    out: Path = typer.Option(Path(_DEFAULT.out), help="Folder for results.json, checkpoint.pt and curves.png."),
    limit: Optional[int] = typer.Option(None, help="Train on the first N images only (quick runs)."),
    resume: bool = typer.Option(False, help="Continue the run whose checkpoint is in --out."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train the 784-H-...-H-10 MNIST MLP; prints the test accuracy at the best dev score.

    The default (meProp, k=20, two hidden layers of 500, 2 epochs) takes a few minutes on a 2-core CPU.
    The reference settings are --epochs 20 (everything else is already the reference's).
    """
    from mesimp_gpu.train.mnist import train_mnist

    with user_errors():
        config = MnistConfig(
            method=method, k=k, hidden=hidden, layers=layers, epochs=epochs, batch_size=batch_size,
            optimizer=optimizer, lr=lr, clip=clip or None, grad_sum=grad_sum, chunks=chunks, seed=seed,
            device=device, backend=backend, data_dir=str(data_dir) if data_dir else None, out=str(out),
            limit=limit, progress=progress,
        )
        results = train_mnist(config, resume=resume)
    final = results["final"]
    times = final["mean_epoch_seconds"]
    typer.echo(
        f"test accuracy {final['test_acc_at_best_dev']:.2f}% at best dev {final['best_dev_acc']:.2f}% | "
        f"sizes {'-'.join(map(str, final['sizes']))} | per epoch: forward {times['forward']:.1f}s, "
        f"backward {times['backward']:.1f}s, update {times['update']:.1f}s | results in {out / 'results.json'}"
    )


train_app.command("pos")(pos_command)


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    app()


if __name__ == "__main__":
    main()

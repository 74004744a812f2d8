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
from mesimp_gpu.bench.config import BenchConfig, Suite
from mesimp_gpu.data.idx import IdxFormatError
from mesimp_gpu.mesimp import MomentReset
from mesimp_gpu.optim import OptimizerName
from mesimp_gpu.train.mnist import Method, MnistConfig, Preset, mnist_config
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


def parse_widths(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"300,200"`` -> ``(300, 200)``; None stays None. ValueError with the offending text otherwise."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--hidden-sizes must be comma-separated integers like 300,200; got {text!r}") from None


def given_options(ctx: typer.Context) -> set[str]:
    """Names of the parameters set on the command line or through the environment, not left at their default."""
    # compared by name: Typer may vendor click, so its ParameterSource enum has no portable import
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"}


@train_app.command("mnist")
def train_mnist_command(
    ctx: typer.Context,
    preset: Optional[Preset] = typer.Option(None, help="paper: exactly the meSimp reference (k 160, prune 0.1, batch "
                                            "100, 20 epochs, 8 chunks, cycles of 5 epochs, moment resets); options "
                                            "given explicitly override it."),
    method: Method = typer.Option(_DEFAULT.method, help="mesimp: top-k back propagation plus prune steps that shrink "
                                  "the network; dense: full back propagation; meprop: per-example top-k (the paper); "
                                  "unified: one top-k set per minibatch; random: k random columns."),
    k: int = typer.Option(_DEFAULT.k, help="Gradient entries kept per example in every hidden layer (meSimp "
                          "reference 160; the meProp paper's MNIST runs use 20)."),
    hidden: int = typer.Option(_DEFAULT.hidden, help="Width of each hidden layer."),
    layers: int = typer.Option(_DEFAULT.layers, help="Number of hidden layers."),
    hidden_sizes: Optional[str] = typer.Option(None, help="Per-layer widths, e.g. 154,160; overrides --hidden and "
                                               "--layers."),
    epochs: int = typer.Option(_DEFAULT.epochs, help="Passes over the 55,000 training images (the reference: 20)."),
    batch_size: int = typer.Option(_DEFAULT.batch_size, help="Examples per update step."),
    optimizer: OptimizerName = typer.Option(_DEFAULT.optimizer, help="Update rule (Adam 0.9/0.999/1e-8, AdaGrad eps 1e-6, SGD)."),
    lr: float = typer.Option(_DEFAULT.lr, help="Learning rate."),
    clip: float = typer.Option(_DEFAULT.clip, help="Element-wise gradient clipping bound; 0 disables."),
    lazy: bool = typer.Option(_DEFAULT.lazy, help="Update only the weight rows that per-example meProp touched in "
                              "the step (exact for SGD and AdaGrad; Adam's moments then decay only on those rows, "
                              "slightly different from Adam); other parameters get the full update."),
    grad_sum: bool = typer.Option(_DEFAULT.grad_sum, "--grad-sum/--grad-mean",
                                  help="Sum the loss over the minibatch (the reference) or average it."),
    chunks: int = typer.Option(_DEFAULT.chunks, help="Dev evaluations (and meSimp prune steps) per epoch; test is "
                               "scored when dev improves."),
    prune: float = typer.Option(_DEFAULT.prune, help="meSimp: remove neurons with hits < floor(examples * prune); "
                                "in [0, 1)."),
    cycle: int = typer.Option(_DEFAULT.cycle, help="meSimp: epochs per cycle; prune after every chunk in even "
                              "cycles, fixed sizes in odd ones (reference 5); 0 prunes in every epoch."),
    reset_moments: MomentReset = typer.Option(_DEFAULT.reset_moments, help="meSimp: when Adam's moments (not its "
                                              "step count) are zeroed: cycle: once at each cycle boundary (the paper); "
                                              "last-epoch: after every chunk of a cycle's last epoch (the C# code); "
                                              "none."),
    nonzero_hits: bool = typer.Option(_DEFAULT.nonzero_hits, "--nonzero-hits/--all-hits",
                                      help="meSimp: count only selected non-zero gradients as hits, or every "
                                      "selected index (the reference)."),
    compare_same_size: bool = typer.Option(_DEFAULT.compare_same_size, help="meSimp: afterwards train a dense MLP "
                                           "of the final sizes from scratch with the same budget and report both."),
    seed: int = typer.Option(_DEFAULT.seed, help="Random seed: same seed, same run."),
    device: str = typer.Option(_DEFAULT.device, help="cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(_DEFAULT.threads, help="torch CPU threads (default: torch's choice; 1 "
                                          "gives steadier timings on a busy machine)."),
    backend: str = typer.Option(_DEFAULT.backend, callback=check_backend,
                                help=f"meProp kernels: {', '.join(BACKEND_NAMES)}."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with the four MNIST IDX files (raw or .gz). Default: "
                                            "$MESIMP_DATA_DIR, then the cache, then download."),
    out: Path = typer.Option(Path(_DEFAULT.out), help="Folder for results.json, checkpoint.pt, model.json/model.pt "
                             "and the plots."),
    limit: Optional[int] = typer.Option(None, help="Train on the first N images only (quick runs)."),
    resume: bool = typer.Option(False, help="Continue the run whose checkpoint is in --out."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train the 784-H-...-H-10 MNIST MLP; prints a summary table (accuracy, kept neurons, parameters, time).

    Default: meSimp (k 160, prune 0.1, two hidden layers of 500), 2 epochs in 1-epoch cycles; minutes on 2 CPU cores.
    Epoch 1 prunes after each of its 8 chunks, epoch 2 trains the fixed sizes.
    --preset paper runs the reference: 20 epochs in cycles of 5.
    """
    from mesimp_gpu.train.mnist import summary_table, train_mnist

    with user_errors():
        settings = dict(
            method=method, k=k, hidden=hidden, layers=layers, hidden_sizes=parse_widths(hidden_sizes), epochs=epochs,
            batch_size=batch_size, optimizer=optimizer, lr=lr, clip=clip or None, lazy=lazy, grad_sum=grad_sum,
            chunks=chunks, prune=prune, cycle=cycle, reset_moments=reset_moments, nonzero_hits=nonzero_hits,
            compare_same_size=compare_same_size, seed=seed, device=device, threads=threads, backend=backend,
            data_dir=str(data_dir) if data_dir else None, out=str(out), limit=limit, progress=progress,
        )
        if preset is not None:  # the preset fills every option the user did not give
            settings = {name: value for name, value in settings.items() if name in given_options(ctx)}
        config = mnist_config(preset, **settings)
        results = train_mnist(config, resume=resume)
    typer.echo(summary_table(results))
    typer.echo(f"test accuracy {results['final']['test_acc_at_best_dev']:.2f}% | results in {out / 'results.json'}, "
               f"model (at the best dev score) in {out / 'model.json'}")


@app.command("evaluate")
def evaluate_command(
    model: Path = typer.Argument(..., help="A model.json written by a training run (or its folder)."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with the four MNIST IDX files. Default: "
                                            "$MESIMP_DATA_DIR, then the cache, then download."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
) -> None:
    """Score a saved MNIST model (dense or meSimp-shrunk) on the 10,000 test images."""
    from mesimp_gpu.data.mnist import load_mnist
    from mesimp_gpu.models.mlp import load_mlp
    from mesimp_gpu.train.common import accuracy, resolve_device

    with user_errors():
        target = resolve_device(device)
        net = load_mlp(model, target)
        test = load_mnist(str(data_dir) if data_dir else None).test
        score = accuracy(net, test.images.to(target), test.labels.to(target))
    params = sum(p.numel() for p in net.parameters())
    typer.echo(f"test accuracy {score:.2f}% on {len(test)} images | sizes {'-'.join(map(str, net.sizes))} | "
               f"{params:,} parameters")


_BENCH = BenchConfig()


@app.command("bench")
def bench_command(
    device: str = typer.Option(_BENCH.device, help="cpu, cuda or cuda:N (cuda adds a calibration of the GPU)."),
    suite: Optional[list[Suite]] = typer.Option(None, help="Suite to run (repeatable). Default: all."),
    quick: bool = typer.Option(False, help="The ~one-minute preset: small grid, few repeats, short training."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch; 0: all cores (default)."),
    batch: Optional[list[int]] = typer.Option(None, help=f"Batch size (repeatable). Default: {_BENCH.batches}."),
    width: Optional[list[int]] = typer.Option(None, help=f"Layer width n (repeatable). Default: {_BENCH.widths}."),
    k: Optional[list[int]] = typer.Option(None, help=f"Kept entries k (repeatable). Default: {_BENCH.ks}."),
    k_fraction: Optional[float] = typer.Option(None, help="Also k = n * this per width; 0 disables. Default: 1/16."),
    cpu_max_gflop: Optional[float] = typer.Option(None, help="Skip layer shapes whose dense forward+backward "
                                                  f"exceeds this many GFLOP on CPU. Default: {_BENCH.cpu_max_gflop:g}."),
    memory_limit_gib: Optional[float] = typer.Option(None, help="Skip providers needing more temporary memory. "
                                                     f"Default: {_BENCH.memory_limit_gib:g}."),
    warmup: Optional[int] = typer.Option(None, help=f"Untimed calls first. Default: {_BENCH.warmup}."),
    min_repeats: Optional[int] = typer.Option(None, help=f"Samples per provider, at least. Default: {_BENCH.min_repeats}."),
    max_repeats: Optional[int] = typer.Option(None, help=f"Samples per provider, at most. Default: {_BENCH.max_repeats}."),
    budget_s: Optional[float] = typer.Option(None, help=f"Timed seconds per shape. Default: {_BENCH.budget_s:g}."),
    min_sample_s: Optional[float] = typer.Option(None, help=f"Least seconds per sample. Default: {_BENCH.min_sample_s:g}."),
    train_limit: Optional[int] = typer.Option(None, help="Train suite: first N training images only (default: all 55,000; "
                                              "full-epoch times are then extrapolated)."),
    train_epochs: Optional[int] = typer.Option(None, help=f"Train suite epochs. Default: {_BENCH.train_epochs}."),
    train_k: Optional[int] = typer.Option(None, help=f"Train suite meProp k. Default: {_BENCH.train_k}."),
    mesimp_k: Optional[int] = typer.Option(None, help=f"Train suite meSimp k. Default: {_BENCH.mesimp_k}."),
    train_optimizer: Optional[OptimizerName] = typer.Option(None, help="Train suite update rule, at the papers' "
                                                            "learning rate (Adam 0.001, AdaGrad 0.1, SGD 0.1). "
                                                            f"Default: {_BENCH.train_optimizer.value}."),
    data_dir: Optional[Path] = typer.Option(None, help="Folder with the four MNIST IDX files (train suite)."),
    out_dir: Optional[Path] = typer.Option(None, help=f"Folder for the results file and plots. Default: {_BENCH.out_dir}."),
    seed: Optional[int] = typer.Option(None, help=f"Seed of the inputs. Default: {_BENCH.seed}."),
    report: Optional[Path] = typer.Option(None, help="Redraw tables and plots of a saved results file; runs nothing."),
) -> None:
    """Time meProp against dense and prior-art baselines; writes bench-<device>-<time>.json, prints tables."""
    import shlex
    import sys

    from mesimp_gpu.bench.config import make_config
    from mesimp_gpu.bench.report import report_file
    from mesimp_gpu.bench.runner import main as run_main

    with user_errors():
        if report is not None:
            typer.echo(report_file(report))
            return
        config = make_config(
            quick, device=device, suites=suite, threads=threads, batches=batch, widths=width, ks=k,
            k_fraction=k_fraction, cpu_max_gflop=cpu_max_gflop, memory_limit_gib=memory_limit_gib, warmup=warmup,
            min_repeats=min_repeats, max_repeats=max_repeats, budget_s=budget_s, min_sample_s=min_sample_s,
            train_limit=train_limit, train_epochs=train_epochs, train_k=train_k, mesimp_k=mesimp_k,
            train_optimizer=train_optimizer, data_dir=str(data_dir) if data_dir else None, out_dir=str(out_dir) if out_dir else None, seed=seed,
        )
        run_main(config, shlex.join(["mesimp-gpu", *sys.argv[1:]]))


train_app.command("pos")(pos_command)


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    app()


if __name__ == "__main__":
    main()

"""``mesimp-gpu bench``: the options mirror :class:`~mesimp_gpu.bench.config.BenchConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mesimp_gpu.bench.config import BenchConfig, Suite
from mesimp_gpu.cli.errors import user_errors
from mesimp_gpu.optim import OptimizerName


_BENCH = BenchConfig()


def bench_command(
    device: str = typer.Option(_BENCH.device, help="cpu, cuda or cuda:N (cuda adds a calibration of the GPU)."),
    suite: Optional[list[Suite]] = typer.Option(None, help="Suite to run (repeatable). Default: all."),
    quick: bool = typer.Option(False, help="The ~one-minute preset: small grid, few repeats, short training."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: all cores)."),
    cpu_arch: Optional[list[str]] = typer.Option(None, help="Instruction-set level of the cpu backend (repeatable: "
                                                 "levels side by side as cpu@LEVEL): native, x86-64-v3, x86-64-v4, "
                                                 "armv8-a. Default: the MESIMP_CPU_ARCH level (native)."),
    cpu_clock: Optional[str] = typer.Option(None, help="CPU timing: wall (default) or process (CPU seconds of all "
                                            "threads together: on a machine busy with other work, with --threads 1)."),
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
    parse_limit: Optional[int] = typer.Option(None, help="Parse suite: first N training sentences only (dev and test: "
                                              "max(N // 10, 100)). Default: all (12,544 in UD English EWT)."),
    parse_epochs: Optional[int] = typer.Option(None, help=f"Parse suite epochs. Default: {_BENCH.parse_epochs}."),
    parse_k: Optional[int] = typer.Option(None, help=f"Parse suite k of meProp and meSimp. Default: {_BENCH.parse_k}."),
    parse_hidden: Optional[int] = typer.Option(None, help="Parse suite hidden units. "
                                               f"Default: {_BENCH.parse_hidden}."),
    parse_decode_repeats: Optional[int] = typer.Option(None, help="Parse suite: timed passes over dev per parser. "
                                                       f"Default: {_BENCH.parse_decode_repeats}."),
    tagger_limit: Optional[int] = typer.Option(None, help="Tagger suite: first N training sentences only (dev and "
                                               "test: max(N // 10, 100)). Default: all."),
    tagger_epochs: Optional[int] = typer.Option(None, help=f"Tagger suite epochs. Default: {_BENCH.tagger_epochs}."),
    tagger_k: Optional[int] = typer.Option(None, help="Tagger suite k per gate of meProp and meSimp. "
                                           f"Default: {_BENCH.tagger_k}."),
    tagger_hidden: Optional[int] = typer.Option(None, help="Tagger suite LSTM units per direction. "
                                                f"Default: {_BENCH.tagger_hidden}."),
    tagger_decode_repeats: Optional[int] = typer.Option(None, help="Tagger suite: timed passes over dev per tagger. "
                                                        f"Default: {_BENCH.tagger_decode_repeats}."),
    ud_dir: Optional[Path] = typer.Option(None, help="Parse and tagger suite treebank: a folder with *train/*dev/*test.conllu"
                                          "[.gz] (default: $MESIMP_UD_DIR; without one the suite is skipped). On all "
                                          "of UD English EWT the suite takes about 15-20 minutes on a 2-core CPU."),
    out_dir: Optional[Path] = typer.Option(None, help=f"Folder for the results file and plots. Default: {_BENCH.out_dir}."),
    seed: Optional[int] = typer.Option(None, help=f"Seed of the inputs. Default: {_BENCH.seed}."),
    dist_processes: Optional[list[int]] = typer.Option(None, help="Distributed suite: process count (repeatable; "
                                                       f"time only up to the cores). Default: {_BENCH.dist_processes}."),
    dist_steps: Optional[int] = typer.Option(None, help=f"Distributed suite: timed steps. Default: {_BENCH.dist_steps}."),
    dist_batch: Optional[int] = typer.Option(None, help="Distributed suite: global minibatch. "
                                             f"Default: {_BENCH.dist_batch}."),
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
            quick, device=device, suites=suite, threads=threads, cpu_archs=cpu_arch, cpu_clock=cpu_clock, batches=batch, widths=width, ks=k,
            k_fraction=k_fraction, cpu_max_gflop=cpu_max_gflop, memory_limit_gib=memory_limit_gib, warmup=warmup,
            min_repeats=min_repeats, max_repeats=max_repeats, budget_s=budget_s, min_sample_s=min_sample_s,
            train_limit=train_limit, train_epochs=train_epochs, train_k=train_k, mesimp_k=mesimp_k,
            train_optimizer=train_optimizer, data_dir=str(data_dir) if data_dir else None,
            parse_limit=parse_limit, parse_epochs=parse_epochs, parse_k=parse_k, parse_hidden=parse_hidden,
            parse_decode_repeats=parse_decode_repeats, ud_dir=str(ud_dir) if ud_dir else None,
            tagger_limit=tagger_limit, tagger_epochs=tagger_epochs, tagger_k=tagger_k, tagger_hidden=tagger_hidden,
            tagger_decode_repeats=tagger_decode_repeats,
            out_dir=str(out_dir) if out_dir else None, seed=seed, dist_processes=dist_processes,
            dist_steps=dist_steps, dist_batch=dist_batch,
        )
        run_main(config, shlex.join(["mesimp-gpu", *sys.argv[1:]]))

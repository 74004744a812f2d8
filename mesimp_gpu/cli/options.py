"""Options that several commands share, declared once so that their names, choices and help agree.

Each maker takes the command's default (the field default of its config dataclass).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import typer

from mesimp_gpu.backends import BACKEND_NAMES
from mesimp_gpu.cli.errors import check_backend


def field_default(config_class: type, name: str) -> Any:
    """The default of field ``name`` of a config dataclass: a command's option defaults are its config's."""
    return next(f.default for f in fields(config_class) if f.name == name)


def prune_option(default: float) -> Any:
    return typer.Option(default, help="meSimp: remove neurons with hits < floor(examples seen * prune) at each "
                        "prune step; in [0, 1).")


def cycle_option(default: int) -> Any:
    return typer.Option(default, help="meSimp: epochs per cycle; prune after every piece in even cycles, fixed "
                        "sizes in odd ones (reference 5); 0 prunes in every epoch.")


def reset_moments_option(default: Any) -> Any:
    return typer.Option(default, help="meSimp: when Adam's moments (not its step count) are zeroed: cycle: once "
                        "at each cycle boundary (the paper); last-epoch: after every piece of a cycle's last epoch "
                        "(the C# code); before-pruning: as last-epoch, but only where a later cycle of the run still "
                        "prunes; none.")


def nonzero_hits_option(default: bool) -> Any:
    return typer.Option(default, "--nonzero-hits/--all-hits", help="meSimp: count only selected non-zero "
                        "gradients as hits, or every selected index (the reference).")


def optimizer_option(default: Any) -> Any:
    return typer.Option(default, help="Update rule (Adam 0.9/0.999/1e-8, AdaGrad eps 1e-6, SGD).")


def lr_option(default: float) -> Any:
    return typer.Option(default, help="Learning rate.")


def clip_option(default: float | None) -> Any:
    return typer.Option(default, help="Element-wise gradient clipping bound; 0 disables.")


def seed_option(default: int) -> Any:
    return typer.Option(default, help="Random seed: same seed, same run.")


def device_option(default: str) -> Any:
    return typer.Option(default, help="cpu, cuda or cuda:N.")


def threads_option(default: int | None) -> Any:
    return typer.Option(default, help="torch CPU threads (default: torch's choice; 1 gives steadier timings on a "
                        "busy machine).")


def backend_option(default: str) -> Any:
    return typer.Option(default, callback=check_backend, help=f"meProp kernels: {', '.join(BACKEND_NAMES)}.")


def resume_option() -> Any:
    return typer.Option(False, help="Continue the run whose checkpoint is in --out (same options).")


def overwrite_option() -> Any:
    return typer.Option(False, "--overwrite", help="Replace the run already in --out (its results, checkpoint, "
                        "model and plots are deleted first).")


def out_option(task: str, writes: str) -> Any:
    return typer.Option(None, help=f"Folder for {writes}. Default: a new runs/{task}-<date>-<time>; a folder that "
                        "already holds a run needs --resume or --overwrite.")


def limit_option(unit: str) -> Any:
    return typer.Option(None, help=f"Quick runs: train on the first N {unit} only, and score dev and test on their "
                        "first max(N // 10, 100).")


def limit_note(limit: int | None, unit: str) -> str:
    """What the result line adds when ``--limit`` cut the data: the scores are on subsets."""
    if limit is None:
        return ""
    return f" (--limit {limit}: scored on the first {max(limit // 10, 100)} dev and test {unit} only)"


def progress_option(default: bool) -> Any:
    return typer.Option(default, help="Show a progress bar.")


def nproc_option() -> Any:
    return typer.Option(1, help="Data-parallel processes to start on this machine (gloo on the CPU, NCCL on CUDA with "
                        "one GPU each); each takes its share of every minibatch. Under torchrun leave it at 1.")


def comm_option() -> Any:
    from mesimp_gpu.train.distributed import Comm

    return typer.Option(Comm.DENSE, help="Several processes: dense: DDP's all-reduce of every gradient; rows: "
                        "meProp weights send only the rows some process touched (unified: the k shared rows).")


def dist_timeout_option() -> Any:
    return typer.Option(300.0, help="Several processes: seconds one waits for the others before the run stops with "
                        "an error.")

"""The ``train`` suite: time per epoch of ``train mnist`` split into forward, backward and update.

This is the paper's overall-speedup table (dense against meProp, here also meSimp, whose forward
pass shrinks as it prunes), each meProp method with the ordinary optimizer and with the lazy one
(``--lazy``: only the weight rows meProp touched are updated). ``dense --lazy`` is dense back
propagation with the same fused update kernel (no rows are skipped): the baseline a reader may
prefer to torch's Adam. Every speedup is over plain ``dense``. By default the suite trains on all
55,000 images (``train_limit`` cuts that; the time per full epoch is then extrapolated linearly);
the accuracy is that of this short run of ``train_epochs`` epochs, not the papers' 20.
The methods take turns epoch by epoch (each run is continued from its checkpoint, which gives the
same result as an uninterrupted run), so a change in machine load hits them alike; still, an epoch
is a coarse unit, and these ratios are noisier than the other suites'.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from mesimp_gpu.backends import get_backend
from mesimp_gpu.bench.common import row
from mesimp_gpu.bench.config import BenchConfig, Provider, Suite
from mesimp_gpu.bench.timing import summarize
from mesimp_gpu.data.mnist import Mnist
from mesimp_gpu.optim import PAPER_LR
from mesimp_gpu.train.records import PHASES
from mesimp_gpu.train.mnist import Method, MnistConfig, train_mnist

T = TypeVar("T")

#: training images of the full MNIST training split (dev excluded), for the per-epoch extrapolation
FULL_TRAIN_IMAGES = 55_000


def methods(config: BenchConfig) -> list[tuple[Method, int, bool]]:
    """``(method, k, lazy)`` in table order: dense (the baseline) first, then each method plain and lazy."""
    return [(Method.DENSE, config.train_k, False), (Method.DENSE, config.train_k, True),
            (Method.MEPROP, config.train_k, False), (Method.MEPROP, config.train_k, True),
            (Method.MESIMP, config.mesimp_k, False), (Method.MESIMP, config.mesimp_k, True)]


def label(method: Method, lazy: bool) -> str:
    """Row label and run folder name, e.g. ``meprop --lazy``."""
    return f"{method.value} --lazy" if lazy else method.value


def train_backends(config: BenchConfig, device: torch.device) -> list[tuple[str, str]]:
    """``(backend name, label suffix)`` of each set of runs: ``auto``'s backend once, or with ``--cpu-arch`` on a CPU
    the cpu backend at each level (``cpu@<level>``, each set with its own dense baseline)."""
    if config.cpu_archs and device.type == "cpu":
        return [(f"cpu@{level}", f" [cpu@{level}]") for level in config.cpu_archs]
    return [(get_backend("auto", device).name, "")]


def take_turns(names: Sequence[str], epochs: int, train_to: Callable[[str, int], T]) -> dict[str, T]:
    """Train every run of ``names`` to epoch 1, then every one to epoch 2, and so on; the last result per run.

    ``train_to(name, epoch)`` trains run ``name`` until it has done ``epoch`` epochs, continuing its
    checkpoint when ``epoch > 1``. Taking turns spreads a change in machine load over all the runs
    alike. The trainers' epoch lines go to stderr: stdout carries the report.
    """
    finished: dict[str, T] = {}
    for epoch in range(1, epochs + 1):
        for name in names:
            with contextlib.redirect_stdout(sys.stderr):
                finished[name] = train_to(name, epoch)
    return finished


def epoch_fields(epoch_seconds: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Row fields of a run's per-epoch phase seconds (a trainer's ``epoch_seconds``): the median epoch with
    its spread, the median of each phase, and the whole run."""
    totals = [sum(e[p] for p in PHASES) for e in epoch_seconds]  # seconds per epoch, all phases
    stats = summarize(totals)
    return {"status": "ok", "median_s": stats.median, "p20_s": stats.p20, "p80_s": stats.p80, "run_s": sum(totals),
            "repeats": stats.repeats,
            "phases_s": {p: float(np.median([e[p] for e in epoch_seconds])) for p in PHASES}}


def add_speedups(rows: Sequence[dict[str, Any]]) -> None:
    """Speedups of every row over the first (the dense baseline): per epoch, whole run and backward phase."""
    dense = rows[0]
    for r in rows:
        r["speedup"] = dense["median_s"] / r["median_s"]  # per epoch (median)
        r["run_speedup"] = dense["run_s"] / r["run_s"]  # all epochs: meSimp's shrinking counts in full
        r["backward_speedup"] = dense["phases_s"]["backward"] / r["phases_s"]["backward"]


def run_train_suite(config: BenchConfig, device: torch.device, data: Mnist,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train each method briefly, taking turns by epoch; one row per method: median epoch, phase split, accuracy."""
    images = len(data.train) if config.train_limit is None else min(config.train_limit, len(data.train))
    runs = {f"{label(method, lazy)}{tag}": (method, k, lazy, backend) for backend, tag in train_backends(config, device)
            for method, k, lazy in methods(config)}
    with tempfile.TemporaryDirectory(prefix="mesimp-bench-") as tmp:

        def train_to(name: str, epoch: int) -> tuple[MnistConfig, dict[str, Any]]:
            method, k, lazy, backend = runs[name]
            settings = MnistConfig(method=method, k=k, lazy=lazy, optimizer=config.train_optimizer,
                                   lr=PAPER_LR[config.train_optimizer], epochs=epoch, device=config.device,
                                   backend=backend, out=str(Path(tmp) / name.translate({ord(c): None for c in " []"})),
                                   limit=config.train_limit, seed=config.seed + 1, progress=False)
            log(f"train mnist {name} (k={k}): epoch {epoch}/{config.train_epochs} on {images} images")
            return settings, train_mnist(settings, resume=epoch > 1, data=data)

        finished = take_turns(list(runs), config.train_epochs, train_to)
    rows: list[dict[str, Any]] = []
    for name, (settings, results) in finished.items():
        backend = settings.backend
        method = settings.method
        timing = epoch_fields(results["epoch_seconds"])
        final = results["final"]
        rows.append(row(
            Suite.TRAIN, Provider.DENSE if method is Method.DENSE else Provider.TOPK, backend,
            method=method.value, lazy=settings.lazy, label=name, batch=settings.batch_size, width=settings.hidden,
            layers=settings.layers, optimizer=settings.optimizer.value, lr=settings.lr,
            k=None if method is Method.DENSE else settings.k, images=images, epochs=config.train_epochs,
            **timing, full_epoch_s=timing["median_s"] * FULL_TRAIN_IMAGES / images,
            test_acc=final["test_acc_at_best_dev"], dev_acc=final["best_dev_acc"], sizes=final["sizes"],
        ))
    for backend in dict.fromkeys(r["backend"] for r in rows):  # each backend's runs over its own dense run
        add_speedups([r for r in rows if r["backend"] == backend])
    return rows

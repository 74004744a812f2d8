"""The ``train`` suite: time per epoch of ``train mnist`` split into forward, backward and update.

This is the paper's overall-speedup table (dense against meProp, here also meSimp, whose forward
pass shrinks as it prunes). To stay affordable it trains on the first ``train_limit`` images for
``train_epochs`` epochs; the time per full 55,000-image epoch is extrapolated linearly and the
accuracy is that of the short run, so it is far below the papers' (both are said in the output).
The methods take turns epoch by epoch (each run is continued from its checkpoint, which gives the
same result as an uninterrupted run), so a change in machine load hits them alike; still, an epoch
is a coarse unit, and these ratios are noisier than the other suites'.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesimp_gpu.backends import get_backend
from mesimp_gpu.bench.common import row
from mesimp_gpu.bench.config import BenchConfig, Provider, Suite
from mesimp_gpu.bench.timing import summarize
from mesimp_gpu.data.mnist import Mnist
from mesimp_gpu.train.common import PHASES
from mesimp_gpu.train.mnist import Method, MnistConfig, train_mnist

#: training images of the full MNIST training split (dev excluded), for the per-epoch extrapolation
FULL_TRAIN_IMAGES = 55_000


def methods(config: BenchConfig) -> list[tuple[Method, int]]:
    """``(method, k)`` in table order: dense, meProp, and meSimp when the trainer offers it."""
    chosen = [(Method.DENSE, config.train_k), (Method.MEPROP, config.train_k)]
    mesimp = Method.__members__.get("MESIMP")
    if mesimp is not None:
        chosen.append((mesimp, config.mesimp_k))
    return chosen


def run_train_suite(config: BenchConfig, device: torch.device, data: Mnist,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train each method briefly, taking turns by epoch; one row per method: median epoch, phase split, accuracy."""
    backend = get_backend("auto", device).name
    finished: dict[Method, tuple[MnistConfig, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="mesimp-bench-") as tmp:
        for epoch in range(1, config.train_epochs + 1):
            for method, k in methods(config):
                settings = MnistConfig(method=method, k=k, epochs=epoch, device=config.device, backend=backend,
                                       out=str(Path(tmp) / method.value), limit=config.train_limit,
                                       seed=config.seed + 1, progress=False)
                log(f"train mnist {method.value} (k={k}): epoch {epoch}/{config.train_epochs} "
                    f"on {config.train_limit} images")
                with contextlib.redirect_stdout(sys.stderr):  # the trainer's epoch lines; stdout carries the tables
                    finished[method] = settings, train_mnist(settings, resume=epoch > 1, data=data)
    rows: list[dict[str, Any]] = []
    for method, (settings, results) in finished.items():
        epochs = results["epoch_seconds"]
        stats = summarize([sum(e[p] for p in PHASES) for e in epochs])
        final = results["final"]
        images = min(config.train_limit, len(data.train))
        rows.append(row(
            Suite.TRAIN, Provider.DENSE if method is Method.DENSE else Provider.TOPK, backend,
            method=method.value, label=method.value, batch=settings.batch_size, width=settings.hidden,
            layers=settings.layers, k=None if method is Method.DENSE else settings.k, images=images,
            epochs=config.train_epochs, status="ok", median_s=stats.median, p20_s=stats.p20, p80_s=stats.p80,
            repeats=stats.repeats, phases_s={p: float(np.median([e[p] for e in epochs])) for p in PHASES},
            full_epoch_s=stats.median * FULL_TRAIN_IMAGES / images,
            test_acc=final["test_acc_at_best_dev"], dev_acc=final["best_dev_acc"], sizes=final["sizes"],
        ))
    dense = rows[0]
    for r in rows:
        r["speedup"] = dense["median_s"] / r["median_s"]
        r["backward_speedup"] = dense["phases_s"]["backward"] / r["phases_s"]["backward"]
    return rows

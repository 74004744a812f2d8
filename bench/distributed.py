"""The ``distributed`` suite: what data-parallel training sends per step, and how long a step takes.

Each configuration trains a model for a few steps with ``N`` processes (gloo on the CPU, NCCL on
CUDA; one thread each on the CPU), the global minibatch split among them as ``train --nproc N`` does:

- models: the MNIST MLP (784-500-500-10) and a wide layer (784-4096-10), both on MNIST images, batch
  ``dist_batch``, meProp's ``k = train_k``;
- methods and communication: ``dense`` back propagation with DDP's dense all-reduce (the baseline);
  per-example ``meprop`` with the dense all-reduce and with the row hook (the rows some process
  touched); ``unified`` with the dense all-reduce and with the row hook, which then sends the ``k``
  rows of the column set all processes share.

The machine-independent figure is the payload: bytes each process hands to all-reduces per step
(gradients, row masks, unified column scores); a ring all-reduce puts about ``2 (N - 1) / N`` times
that on each process's link (``wire_bytes``). Time per step (forward, backward with communication,
update; process 0's median) is measured where every process has a core of its own; runs with more
processes than cores (``dist_processes`` beyond the core count) report volume only.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mesimp_gpu.bench.common import row
from mesimp_gpu.bench.config import BenchConfig, Provider, Suite, all_cores
from mesimp_gpu.bench.timing import summarize
from mesimp_gpu.data.mnist import Mnist
from mesimp_gpu.meprop import MePropConfig, MePropMode
from mesimp_gpu.models.mlp import MLP
from mesimp_gpu.train.distributed import (
    Comm,
    DataParallel,
    DistributedOptions,
    dense_bytes,
    join_run,
    launch,
)

#: model name -> layer sizes
MODELS = {"mnist-mlp": [784, 500, 500, 10], "wide-4096": [784, 4096, 10]}

#: (method, communication) per model, in table order; dense first (the baseline)
CASES = [(MePropMode.DENSE, Comm.DENSE), (MePropMode.TOPK, Comm.DENSE), (MePropMode.TOPK, Comm.ROWS),
         (MePropMode.UNIFIED, Comm.DENSE), (MePropMode.UNIFIED, Comm.ROWS)]

#: untimed steps before the timed ones (DDP rebuilds its buckets after the first)
WARMUP = 3


@dataclass(frozen=True)
class Spec:
    """One configuration of the suite."""

    model: str
    mode: MePropMode
    comm: Comm
    k: int
    batch: int
    steps: int
    backend: str = "auto"  # meProp kernels

    @property
    def provider(self) -> Provider:
        return Provider.ROW_HOOK if self.comm is Comm.ROWS else Provider.DDP_DENSE

    @property
    def method(self) -> str:
        return {MePropMode.DENSE: "dense", MePropMode.TOPK: "meprop", MePropMode.UNIFIED: "unified"}[self.mode]


def measure(spec: Spec, images: Tensor, labels: Tensor, device: torch.device) -> dict[str, Any]:
    """Train ``spec`` for ``WARMUP + steps`` steps as one process of the run; per-step bytes and seconds."""
    procs = join_run(device, timeout_s=300.0)  # a single process unless launched
    dp = DataParallel(procs, DistributedOptions(comm=spec.comm), device)
    torch.manual_seed(0)
    model = MLP(MODELS[spec.model], MePropConfig(spec.mode, spec.k, spec.backend)).to(device)
    net = dp.wrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    seconds, sent = [], []
    for step in range(WARMUP + spec.steps):
        batch = dp.shard(torch.arange(step * spec.batch, (step + 1) * spec.batch), mean_loss=False)
        x, y = images[batch].to(device), labels[batch].to(device)
        if procs.world > 1:
            dist.barrier()  # every process starts the step together: the time is the step's, not a wait's
        before = dp.stats.bytes
        start = time.perf_counter()
        loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        dp.backward(loss)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if step >= WARMUP:
            seconds.append(elapsed)
            ddp = dense_bytes(model) if procs.world > 1 and spec.comm is Comm.DENSE else 0
            sent.append(dp.stats.bytes - before + ddp)
    collectives = dp.stats.collectives
    return {"seconds": seconds, "bytes": sent, "collectives": collectives, "dense_bytes": dense_bytes(model)}


def worker(specs: list[Spec], images: Tensor, labels: Tensor, device: str, folder: str) -> None:
    """One process of a launched run: every spec in turn; process 0 keeps the measurements."""
    results = [measure(spec, images, labels, torch.device(device)) for spec in specs]
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, Path(folder, "measured.pt"))


def run_processes(nproc: int, specs: list[Spec], images: Tensor, labels: Tensor, device: torch.device) -> list[dict]:
    """The measurements of ``specs`` with ``nproc`` processes (this one when ``nproc`` is 1)."""
    if nproc == 1:
        return [measure(spec, images, labels, device) for spec in specs]
    with tempfile.TemporaryDirectory(prefix="mesimp-bench-") as folder:
        launch(nproc, worker, specs, images, labels, str(device), folder, threads=1)
        return torch.load(Path(folder, "measured.pt"), weights_only=False)


def run_distributed_suite(config: BenchConfig, device: torch.device, data: Mnist,
                          log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every model and case of the suite for each process count of ``config.dist_processes``."""
    steps, batch = config.dist_steps, config.dist_batch
    needed = (WARMUP + steps) * batch
    images, labels = data.train.images[:needed].clone(), data.train.labels[:needed].clone()
    if len(labels) < needed:
        raise ValueError(f"the distributed suite needs {needed} training images, the data has {len(labels)}")
    specs = [Spec(model, mode, comm, config.train_k, batch, steps) for model in MODELS for mode, comm in CASES]
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    rows: list[dict[str, Any]] = []
    for nproc in config.dist_processes:
        if device.type == "cuda" and nproc > gpus:
            log(f"distributed suite: {nproc} processes skipped, {gpus} GPU(s) here")
            continue
        log(f"distributed suite: {nproc} process(es)")
        timed = nproc <= (all_cores() if device.type == "cpu" else gpus)
        # one process sends nothing: its communication settings all train alike
        chosen = [s for s in specs if nproc > 1 or s.comm is Comm.DENSE]
        for spec, m in zip(chosen, run_processes(nproc, chosen, images, labels, device)):
            stats = summarize(m["seconds"])
            payload = sum(m["bytes"]) / len(m["bytes"])
            rows.append(row(Suite.DISTRIBUTED, spec.provider, None, status="ok", model=spec.model,
                            sizes=MODELS[spec.model], method=spec.method, comm=spec.comm.value, processes=nproc,
                            k=spec.k, batch=batch, steps=steps, bytes_per_step=payload,
                            wire_bytes_per_step=payload * 2 * (nproc - 1) / nproc,
                            dense_bytes_per_step=m["dense_bytes"] if nproc > 1 else 0,
                            timed=timed, median_s=stats.median if timed else None,
                            p20_s=stats.p20 if timed else None, p80_s=stats.p80 if timed else None))
    return rows


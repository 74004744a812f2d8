"""The ``topk`` suite: row-wise selection alone, each backend's ``topk_indices`` against ``torch.topk``.

``torch.topk(|G|, k)`` is what a plain PyTorch meProp does (its tie order is unspecified, and the
``abs`` is part of its cost, as ``topk_indices`` reads ``G`` itself). Besides the time, every row
gives the effective bandwidth: bytes of ``G`` read per second, the figure a selection that reads
``G`` once should bring close to the memory bandwidth. Each provider's index sets are compared
once with the reference selection; ``max_error`` is the fraction of rows that differ (must be 0).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mesimp_gpu.backends import Backend
from mesimp_gpu.backends.reference import ReferenceBackend
from mesimp_gpu.bench import traffic
from mesimp_gpu.bench.common import check_fields, row, timed_fields
from mesimp_gpu.bench.config import BenchConfig, Provider, Suite
from mesimp_gpu.bench.timing import Clock, measure

DTYPE = torch.float32


def torch_topk(g: Tensor, k: int) -> Tensor:
    """The plain-PyTorch selection: indices of the ``k`` largest ``|g|`` per row (unordered)."""
    return g.abs().topk(k, dim=1, sorted=False).indices


def mismatch(idx: Tensor, expected: Tensor) -> float:
    """Fraction of rows whose index *set* differs from ``expected``'s (``[B, k]`` each)."""
    return float((idx.sort(dim=1).values != expected).any(dim=1).double().mean())


def run_topk_suite(config: BenchConfig, device: torch.device, backends: dict[str, Backend], clock: Clock,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows of the topk suite over the (batch, width) grid, all k of one shape side by side."""
    reference = ReferenceBackend()
    rows: list[dict[str, Any]] = []
    for batch in config.batches:
        for width in config.widths:
            torch.manual_seed(config.seed * 1_000_003 + batch * 10_007 + width + 1)
            g = torch.randn(batch, width, device=device, dtype=DTYPE)
            entries: list[tuple[Provider, str | None, int, Callable[[], Tensor]]] = []
            for k in config.layer_ks(width):
                entries.append((Provider.TORCH_TOPK, None, k, functools.partial(torch_topk, g, k)))
                entries += [(Provider.SELECT, name, k, functools.partial(b.topk_indices, g, k))
                            for name, b in backends.items()]
            expected = {k: reference.topk_indices(g, k) for k in config.layer_ks(width)}
            checks = [check_fields(mismatch(fn(), expected[k]), 0.0) for _, _, k, fn in entries]
            log(f"topk B={batch} n={width}: {len(entries)} providers side by side")
            stats = measure([fn for *_, fn in entries], clock, config)
            baseline = {k: s for (p, _, k, _), s in zip(entries, stats) if p is Provider.TORCH_TOPK}
            read_bytes = batch * width * DTYPE.itemsize
            for (provider, name, k, _), s, ok in zip(entries, stats, checks):
                # the traffic model of the Triton selection (bench/traffic.py), for the report's model table
                model = traffic.selection(batch, width, k, DTYPE.itemsize, False).fields() if name == "triton" else {}
                rows.append(row(Suite.TOPK, provider, name, batch=batch, width=width, k=k, k_fraction=k / width,
                                dtype=str(DTYPE).removeprefix("torch."), **timed_fields(s, baseline[k]),
                                bandwidth_gbs=read_bytes / s.median / 1e9, **ok, **model))
    return rows

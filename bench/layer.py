"""The ``layer`` suite: one hidden linear layer ``n -> n``, backward and forward+backward.

For every (batch, width) a fresh layer and fresh inputs are drawn; then dense autograd, meProp
(per example, unified and random, on every backend native to the device) and the prior-art
baselines of :mod:`mesimp_gpu.bench.prior_art` run on the *same* tensors, side by side, for every k.
Each provider is first checked once against the reference backend (float64, dense masks).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mesimp_gpu.backends import Backend
from mesimp_gpu.backends.reference import ReferenceBackend
from mesimp_gpu.bench import traffic
from mesimp_gpu.bench.common import TOLERANCE, check_fields, relative_error, row, timed_fields
from mesimp_gpu.bench.config import BenchConfig, Pass, Provider, Suite
from mesimp_gpu.bench.prior_art import PriorScatterFunction, PriorSparseFunction
from mesimp_gpu.bench.timing import Clock, measure
from mesimp_gpu.meprop import MePropConfig, MePropLinear, MePropMode, random_indices

#: meProp providers and the MePropLinear mode each one runs
MEPROP_MODES = {Provider.TOPK: MePropMode.TOPK, Provider.UNIFIED: MePropMode.UNIFIED, Provider.RANDOM: MePropMode.RANDOM}
PRIOR_FUNCTIONS = {Provider.PRIOR_SCATTER: PriorScatterFunction, Provider.PRIOR_SPARSE: PriorSparseFunction}
DTYPE = torch.float32


@dataclass(frozen=True)
class Candidate:
    """One provider at one k: ``forward(x)`` builds the autograd graph whose backward is timed."""

    provider: Provider
    backend: str | None
    k: int | None  # None for dense
    forward: Callable[[Tensor], Tensor]


def dense_flop(batch: int, width: int) -> float:
    """FLOPs of a dense forward (one GEMM) and backward (two GEMMs) of an ``n -> n`` layer."""
    return 6.0 * batch * width * width


def workspace_bytes(provider: Provider, backend: str | None, batch: int, width: int, k: int | None) -> int:
    """Temporaries a provider allocates beyond the dense layer's, to skip shapes that would not fit.

    The portable torch backend gathers ``W[idx]`` (``[B, k, in]``) for per-example ``dx``; random
    selection sorts a ``[B, out]`` random matrix. Everything else stays within ``O(B n + n^2)``.
    """
    size = DTYPE.itemsize
    extra = 0
    if backend == "torch" and provider in (Provider.TOPK, Provider.RANDOM) and k is not None:
        extra += batch * k * width * size
    if provider is Provider.RANDOM:
        extra += batch * width * (size + 8)  # rand values and argsort's int64 indices
    return extra


def meprop_layer(shared: MePropLinear, config: MePropConfig) -> MePropLinear:
    """A view of ``shared`` with another backward configuration (same weight and bias tensors)."""
    layer = copy.copy(shared)  # a shallow copy shares the parameters; config is a plain attribute
    layer.config = config
    return layer


def prior_forward(function: type[torch.autograd.Function], weight: Tensor, bias: Tensor, k: int, x: Tensor) -> Tensor:
    """``function.apply`` with the layer's parameters bound (for :func:`functools.partial`)."""
    return function.apply(x, weight, bias, k)


def candidates(shared: MePropLinear, ks: list[int], backends: dict[str, Backend]) -> list[Candidate]:
    """Dense first (the baseline), then every meProp mode on every backend, then the prior art, for each k."""
    weight, bias = shared.weight, shared.bias
    out = [Candidate(Provider.DENSE, None, None, functools.partial(torch.nn.functional.linear, weight=weight, bias=bias))]
    for k in ks:
        for name in backends:
            for provider, mode in MEPROP_MODES.items():
                out.append(Candidate(provider, name, k, meprop_layer(shared, MePropConfig(mode, k, name))))
        for provider, function in PRIOR_FUNCTIONS.items():
            out.append(Candidate(provider, None, k, functools.partial(prior_forward, function, weight, bias, k)))
    return out


class Oracle:
    """Expected ``(dx, dW)`` of each candidate from the reference backend, computed once per (selection, k)."""

    def __init__(self, x: Tensor, g: Tensor, weight: Tensor, seed: int) -> None:
        self.x, self.g, self.weight = x.detach(), g, weight.detach()
        self.seed = seed  # torch's seed right before each candidate's checked backward
        self.reference = ReferenceBackend()
        self.cache: dict[tuple[Provider, int | None], tuple[Tensor, Tensor]] = {}

    def expected(self, provider: Provider, k: int | None) -> tuple[Tensor, Tensor]:
        """The reference ``(dx, dW)`` for ``provider`` at ``k``; the prior art selects like per-example meProp."""
        selection = Provider.TOPK if provider in PRIOR_FUNCTIONS else provider
        if (selection, k) not in self.cache:
            self.cache[selection, k] = self.compute(selection, k)
        return self.cache[selection, k]

    def compute(self, selection: Provider, k: int | None) -> tuple[Tensor, Tensor]:
        """The reference products for one selection rule (dense: all columns, in float64)."""
        ref, g, x, weight = self.reference, self.g, self.x, self.weight
        if selection is Provider.DENSE:
            return g.double() @ weight.double(), g.double().t() @ x.double()
        if selection is Provider.UNIFIED:
            dx, dw, _ = ref.unified_backward(g, x, weight, k)
            return dx, dw
        if selection is Provider.RANDOM:
            # the columns random_indices draws right after manual_seed(seed): the same for every backend
            torch.manual_seed(self.seed)
            return ref.sparse_backward(g, random_indices(g.shape[0], g.shape[1], k, g.device), x, weight)
        return ref.sparse_backward(g, ref.topk_indices(g, k), x, weight)


def check(candidate: Candidate, oracle: Oracle, x: Tensor, g: Tensor, params: tuple[Tensor, ...]) -> float:
    """Run the candidate's forward and backward once; the relative error of ``dx`` and ``dW`` against the oracle."""
    torch.manual_seed(oracle.seed)  # random selection draws its columns from torch's generator inside backward
    dx, dw, _ = torch.autograd.grad(candidate.forward(x), (x, *params), g)
    expected = oracle.expected(candidate.provider, candidate.k)
    return max(relative_error(dx, expected[0]), relative_error(dw, expected[1]))


def model_fields(candidate: Candidate, mode: Pass, batch: int, width: int) -> dict[str, float]:
    """The traffic model's totals (:mod:`mesimp_gpu.bench.traffic`) for the Triton per-example backward; none
    for other rows."""
    if candidate.backend != "triton" or candidate.provider is not Provider.TOPK or mode is not Pass.BACKWARD:
        return {}
    assert candidate.k is not None
    return traffic.topk_backward(batch, width, candidate.k, width, DTYPE.itemsize).fields()


def timed_call(candidate: Candidate, mode: Pass, x: Tensor, g: Tensor, params: tuple[Tensor, ...]) -> Callable[[], Any]:
    """The callable to time: backward from a retained graph, or a fresh forward and its backward."""
    if mode is Pass.BACKWARD:
        y = candidate.forward(x)
        return functools.partial(torch.autograd.grad, y, (x, *params), g, retain_graph=True)
    return lambda: torch.autograd.grad(candidate.forward(x), (x, *params), g)


def run_shape(config: BenchConfig, device: torch.device, backends: dict[str, Backend], clock: Clock,
              batch: int, width: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """All rows of one (batch, width): checks, then both passes timed side by side."""
    shape = {"batch": batch, "width": width, "in_features": width, "dtype": str(DTYPE).removeprefix("torch.")}
    gflop = dense_flop(batch, width) / 1e9
    if device.type == "cpu" and gflop > config.cpu_max_gflop:
        reason = (f"skipped on CPU: dense forward+backward is {gflop:.0f} GFLOP per call, over "
                  f"--cpu-max-gflop {config.cpu_max_gflop:g}")
        log(f"layer B={batch} n={width}: {reason}")
        return [row(Suite.LAYER, Provider.DENSE, None, **shape, k=None, k_fraction=None,
                    **{"pass": None}, status="skipped", reason=reason)]
    seed = config.seed * 1_000_003 + batch * 10_007 + width
    torch.manual_seed(seed)
    shared = MePropLinear(width, width).to(device)  # the reference initialisation: never zeros
    x = torch.randn(batch, width, device=device, requires_grad=True)
    g = torch.randn(batch, width, device=device)
    params = (shared.weight, shared.bias)
    oracle = Oracle(x, g, shared.weight, seed)
    limit = config.memory_limit_gib * 2**30
    rows, runnable, checks = [], [], []
    for c in candidates(shared, config.layer_ks(width), backends):
        fields = {**shape, "k": c.k, "k_fraction": c.k / width if c.k else None}
        need = workspace_bytes(c.provider, c.backend, batch, width, c.k)
        if need > limit:
            reason = f"needs {need / 2**30:.1f} GiB of temporaries, over --memory-limit-gib {config.memory_limit_gib:g}"
            rows.append(row(Suite.LAYER, c.provider, c.backend, **fields, **{"pass": None}, status="skipped", reason=reason))
            continue
        runnable.append(c)
        checks.append(check_fields(check(c, oracle, x, g, params), TOLERANCE[DTYPE]))
    del oracle  # its float64 products take gigabytes at n = 8192; free them before timing
    for mode in Pass:
        log(f"layer B={batch} n={width} {mode.value}: {len(runnable)} providers side by side")
        stats = measure([timed_call(c, mode, x, g, params) for c in runnable], clock, config)
        dense = stats[0]  # candidates() puts dense first
        for c, s, ok in zip(runnable, stats, checks):
            rows.append(row(Suite.LAYER, c.provider, c.backend, **shape, k=c.k,
                            k_fraction=c.k / width if c.k else None, **{"pass": mode.value}, **timed_fields(s, dense),
                            **ok, **model_fields(c, mode, batch, width)))
    return rows


def run_layer_suite(config: BenchConfig, device: torch.device, backends: dict[str, Backend], clock: Clock,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows of the layer suite over the whole (batch, width) grid."""
    return [r for batch in config.batches for width in config.widths
            for r in run_shape(config, device, backends, clock, batch, width, log)]

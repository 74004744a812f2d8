"""Timing: clocks for CPU and CUDA, interleaved measurement of several providers, and statistics.

Providers of one configuration are timed *side by side*: every round calls each of them once
(in a rotated order), so a change in machine load during the run hits all of them alike and the
ratios stay meaningful on a shared machine. A sample is the mean of ``inner`` back-to-back calls,
with ``inner`` chosen so that one sample lasts at least ``min_sample_s`` (timer resolution and
per-call noise); the reported numbers are the median and the 20th/80th percentiles of the samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import numpy as np
import torch

from mesimp_gpu.bench.config import BenchConfig

Output = TypeVar("Output")


@dataclass(frozen=True)
class Stats:
    """Summary of timed samples, in seconds per call."""

    median: float
    p20: float
    p80: float
    repeats: int  # number of samples
    inner: int = 1  # calls averaged in each sample


def summarize(samples: Sequence[float], inner: int = 1) -> Stats:
    """Median and 20th/80th percentiles (linear interpolation) of ``samples``."""
    if not samples:
        raise ValueError("no samples to summarize")
    p20, median, p80 = np.percentile(np.asarray(samples, dtype=float), [20, 50, 80])
    return Stats(float(median), float(p20), float(p80), len(samples), inner)


def speedup(baseline: Stats, other: Stats) -> float:
    """How many times faster ``other`` is than ``baseline``, by medians."""
    return baseline.median / other.median


def rounds_for(estimates: Sequence[float], budget_s: float, min_repeats: int, max_repeats: int) -> int:
    """Rounds that fit ``budget_s`` when one round costs ``sum(estimates)``, clamped to the repeat bounds."""
    cost = sum(estimates)
    wanted = math.ceil(budget_s / cost) if cost > 0 else max_repeats
    return max(min_repeats, min(max_repeats, wanted))


class Clock(Protocol):
    """Measures the mean seconds per call of ``inner`` back-to-back calls of ``fn``."""

    def per_call(self, fn: Callable[[], object], inner: int) -> float: ...


class CpuClock:
    """Wall clock (``perf_counter``); CPU work is synchronous."""

    def per_call(self, fn: Callable[[], object], inner: int) -> float:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) / inner


class CudaClock:
    """CUDA events around the calls; the queue is drained first so that only these calls are timed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def per_call(self, fn: Callable[[], object], inner: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner


class ProcessClock:
    """CPU seconds of this process, all threads together (``process_time``), per call. On a machine shared with
    other work a wall clock also counts the time this process waited for a core (and, with several threads,
    every parallel region's wait for a descheduled worker); this counts only the time it computed. With one
    thread it is the wall time of an idle machine; with more it sums the threads (and their spin-waits)."""

    def per_call(self, fn: Callable[[], object], inner: int) -> float:
        start = time.process_time()
        for _ in range(inner):
            fn()
        return (time.process_time() - start) / inner


#: the CPU clocks of ``--cpu-clock``
CPU_CLOCKS = {"wall": CpuClock, "process": ProcessClock}


def clock_for(device: torch.device, cpu_clock: str = "wall") -> Clock:
    """The right clock for ``device``: CUDA events, or on CPU the ``cpu_clock`` of :data:`CPU_CLOCKS`."""
    return CudaClock(device) if device.type == "cuda" else CPU_CLOCKS[cpu_clock]()


def measure(fns: Sequence[Callable[[], object]], clock: Clock, plan: BenchConfig) -> list[Stats]:
    """Time every callable of ``fns`` side by side; returns one :class:`Stats` per callable, in order.

    ``plan`` supplies ``warmup``, ``min_repeats``, ``max_repeats``, ``budget_s`` and ``min_sample_s``.
    """
    for fn in fns:
        for _ in range(plan.warmup):
            fn()
    estimates = [clock.per_call(fn, 1) for fn in fns]
    inner = [max(1, math.ceil(plan.min_sample_s / max(e, 1e-9))) for e in estimates]
    rounds = rounds_for([e * i for e, i in zip(estimates, inner)], plan.budget_s, plan.min_repeats, plan.max_repeats)
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for j in range(len(fns)):
            i = (j + r) % len(fns)  # rotate so that no provider always runs first (cold caches) or last
            samples[i].append(clock.per_call(fns[i], inner[i]))
    return [summarize(s, n) for s, n in zip(samples, inner)]


def time_passes(passes: dict[str, Callable[[], Output]], repeats: int, clock: Clock,
                config: BenchConfig) -> tuple[list[Stats], dict[str, Output]]:
    """Time whole passes (decoding or tagging a split) side by side, ``repeats`` samples of one pass each;
    returns their :class:`Stats` in ``passes``' order and each pass's output from its last call."""
    last: dict[str, Output] = {}

    def keeping(name: str) -> Callable[[], None]:
        def call() -> None:
            last[name] = passes[name]()
        return call

    # no warm-up beyond measure's untimed estimate (one full pass each), one pass per sample, a fixed count
    plan = replace(config, warmup=0, min_repeats=repeats, max_repeats=repeats, min_sample_s=1e-9)
    return measure([keeping(name) for name in passes], clock, plan), last

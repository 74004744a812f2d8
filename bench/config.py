"""Settings of ``mesimp-gpu bench``: one frozen dataclass whose fields the CLI options mirror.

Two presets: the full benchmark (the defaults below) and ``--quick`` (:data:`QUICK`, about a
minute on a 2-core CPU). Options given on the command line override the preset's values.

The ``parse`` suite is part of the default run, and costs something only where a treebank is given
(``--ud-dir`` or ``MESIMP_UD_DIR``; without one it gives one row saying it was skipped and why). On
all of UD English EWT (12,544 training sentences) it is the most expensive suite on a CPU: three
parsers trained for two epochs, dev parsed after each half epoch, then the dev split decoded six
times per parser; about 15-20 minutes on 2 cores (estimated from 2,000-sentence runs), roughly as
long as all the other suites together. ``--parse-limit`` cuts it; ``--suite`` leaves it out.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from mesimp_gpu.backends.cpu import ARCH_LEVELS
from mesimp_gpu.optim import OptimizerName


class Suite(str, enum.Enum):
    """What to measure. The CUDA calibration is not a suite: it runs with every ``--device cuda`` run."""

    LAYER = "layer"  # one hidden linear layer: backward, forward+backward
    TOPK = "topk"  # row-wise top-k selection alone
    TRAIN = "train"  # time per epoch of MNIST training, split by phase
    PARSE = "parse"  # time per epoch of parser training by phase, and decoding speed of the simplified parser
    TAGGER = "tagger"  # time per epoch of POS-tagger training by phase, and tagging speed of the simplified tagger
    DISTRIBUTED = "distributed"  # data-parallel training: bytes sent and time per step, dense all-reduce vs row hook


class Pass(str, enum.Enum):
    """Which part of a layer step is timed."""

    BACKWARD = "backward"  # autograd backward from a retained graph
    FORWARD_BACKWARD = "forward+backward"  # a fresh forward, then its backward


class Provider(str, enum.Enum):
    """Who computes a measured row."""

    DENSE = "dense"  # torch.nn.functional.linear with ordinary autograd: the baseline of every speedup
    TOPK = "meprop-topk"  # MePropLinear, per-example top-k (the paper's method) on one backend
    UNIFIED = "meprop-unified"  # MePropLinear, one top-k column set per minibatch
    RANDOM = "meprop-random"  # MePropLinear, k random columns per example (ablation)
    PRIOR_SCATTER = "prior-scatter"  # torch.topk, dense scatter of G_k, two full GEMMs
    PRIOR_SPARSE = "prior-sparse"  # torch.topk, a sparse COO G_k, torch.sparse.mm (the authors' GPU code)
    TORCH_TOPK = "torch.topk"  # torch.topk of |G|: the baseline of the topk suite
    SELECT = "topk_indices"  # a backend's row-wise selection (Backend.topk_indices)
    SIMPLIFIED = "mesimp-simplified"  # parse/tagger suite decoding: the meSimp-trained model at its pruned size
    DDP_DENSE = "ddp-dense"  # distributed suite: DDP's all-reduce of every gradient entry
    ROW_HOOK = "row-hook"  # distributed suite: only the rows of dW some process touched (unified: the shared k)


def all_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchConfig:
    """Every setting of ``mesimp-gpu bench``; the defaults are the full benchmark."""

    device: str = "cpu"  # cpu, cuda or cuda:N
    suites: tuple[Suite, ...] = tuple(Suite)  # suites to run, in this order
    quick: bool = False  # True: the ~one-minute preset (QUICK); recorded in the results
    threads: int | None = None  # CPU threads for torch (and the cpu backend); None: all cores of this process
    batches: tuple[int, ...] = (10, 100, 1024)  # layer and topk suites: minibatch sizes
    widths: tuple[int, ...] = (500, 2048, 4096, 8192)  # layer and topk suites: layer width n (in = out = n)
    ks: tuple[int, ...] = (5, 20, 128, 160)  # kept entries per example; values >= n are left out
    cpu_archs: tuple[str, ...] = ()  # cpu backend levels side by side (cpu@LEVEL); (): the MESIMP_CPU_ARCH one
    cpu_clock: str = "wall"  # CPU timing: wall, or process (CPU seconds of all threads: for a busy machine)
    k_fraction: float = 1 / 16  # also k = round(n * k_fraction) per width; 0 disables
    cpu_max_gflop: float = 100.0  # on CPU, skip layer shapes whose dense forward+backward exceeds this
    memory_limit_gib: float = 4.0  # skip a provider whose temporaries would exceed this (e.g. W[idx] gathers)
    warmup: int = 1  # untimed calls per provider before timing (one more call then estimates its cost)
    min_repeats: int = 5  # timed samples per provider, at least
    max_repeats: int = 50  # timed samples per provider, at most
    budget_s: float = 4.0  # target timed seconds per configuration (all providers, one pass)
    min_sample_s: float = 2e-3  # calls are looped until one sample lasts this long (timer resolution)
    train_limit: int | None = None  # train suite: first N training images (and N // 10 dev/test); None: all
    train_epochs: int = 2  # train suite: epochs per method; the median epoch is reported
    train_k: int = 20  # train suite: k of meProp (the paper's MNIST setting)
    mesimp_k: int = 160  # train suite: k of meSimp (the meSimp reference's MNIST setting)
    train_optimizer: OptimizerName = OptimizerName.ADAM  # train suite: update rule, at its PAPER_LR
    data_dir: str | None = None  # MNIST folder; default: MESIMP_DATA_DIR, cache, download
    parse_limit: int | None = None  # parse suite: first N training sentences (dev/test: max(N // 10, 100)); None: all
    parse_epochs: int = 2  # parse suite: epochs per method (meSimp prunes in the first, recovers in the second)
    parse_k: int = 20  # parse suite: k of meProp and meSimp (the papers' parsing setting)
    parse_hidden: int = 500  # parse suite: hidden units of the parser (the papers: 500)
    parse_decode_repeats: int = 5  # parse suite: timed passes over dev per parser (after one untimed pass)
    tagger_limit: int | None = None  # tagger suite: first N training sentences (dev/test: max(N // 10, 100)); None: all
    tagger_epochs: int = 2  # tagger suite: epochs per method (meSimp prunes in the first, recovers in the second)
    tagger_k: int = 5  # tagger suite: k per gate of meProp and meSimp (the meProp paper's POS setting)
    tagger_hidden: int = 200  # tagger suite: LSTM units per direction (train pos --preset competitive)
    tagger_decode_repeats: int = 5  # tagger suite: timed passes over dev per tagger (after one untimed pass)
    dist_processes: tuple[int, ...] = (1, 2, 4)  # distributed suite: process counts (time only up to the cores)
    dist_steps: int = 20  # distributed suite: timed steps per configuration (after 3 untimed ones)
    dist_batch: int = 100  # distributed suite: global minibatch, split among the processes
    ud_dir: str | None = None  # parse suite: folder with *train/*dev/*test.conllu[.gz]; default: MESIMP_UD_DIR
    out_dir: str = "runs/bench"  # where bench-<device>-<time>.json and its plots are written (relative: to the
    # current folder, like every run folder)
    seed: int = 0  # seeds the inputs of every configuration

    def __post_init__(self) -> None:
        positive = {"batch": self.batches, "width": self.widths, "k": self.ks, "dist-processes": self.dist_processes,
                    "dist-steps": (self.dist_steps,), "dist-batch": (self.dist_batch,)}
        for name, values in positive.items():
            if not values or any(v < 1 for v in values):
                raise ValueError(f"--{name} needs positive values, got {list(values)}")
        if not self.suites:
            raise ValueError("choose at least one --suite")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1 (leave it out for all cores), got {self.threads}")
        if not 0 <= self.k_fraction < 1:
            raise ValueError(f"--k-fraction must be in [0, 1), got {self.k_fraction}")
        if self.min_repeats < 1 or self.max_repeats < self.min_repeats:
            raise ValueError(f"need 1 <= --min-repeats <= --max-repeats, got {self.min_repeats}, {self.max_repeats}")
        if self.warmup < 0 or self.budget_s <= 0 or self.min_sample_s <= 0:
            raise ValueError("--warmup must be >= 0 and --budget-s, --min-sample-s positive")
        if self.cpu_clock not in ("wall", "process"):
            raise ValueError(f"--cpu-clock must be wall or process, got {self.cpu_clock!r}")
        unknown_levels = [a for a in self.cpu_archs if a not in ARCH_LEVELS]
        if unknown_levels:
            raise ValueError(f"--cpu-arch {unknown_levels[0]!r} is not a level; choose from: {', '.join(ARCH_LEVELS)}")
        if (self.train_limit is not None and self.train_limit < 1) or self.train_epochs < 1 or self.train_k < 1 or self.mesimp_k < 1:
            raise ValueError("--train-limit, --train-epochs, --train-k and --mesimp-k must be at least 1")
        if ((self.parse_limit is not None and self.parse_limit < 1) or self.parse_epochs < 1 or self.parse_k < 1
                or self.parse_hidden < 1 or self.parse_decode_repeats < 1):
            raise ValueError("--parse-limit, --parse-epochs, --parse-k, --parse-hidden and --parse-decode-repeats "
                             "must be at least 1")
        if self.parse_k > self.parse_hidden:
            raise ValueError(f"--parse-k {self.parse_k} exceeds --parse-hidden {self.parse_hidden}")
        if ((self.tagger_limit is not None and self.tagger_limit < 1) or min(self.tagger_epochs, self.tagger_k,
                                                                          self.tagger_hidden, self.tagger_decode_repeats) < 1):
            raise ValueError("--tagger-limit, --tagger-epochs, --tagger-k, --tagger-hidden and --tagger-decode-repeats "
                             "must be at least 1")

    @property
    def thread_count(self) -> int:
        """The thread count actually used: ``threads``, or all cores when None."""
        return self.threads or all_cores()

    def layer_ks(self, width: int) -> list[int]:
        """The k values measured at ``width``: ``ks`` and ``width * k_fraction``, ascending, each < ``width``."""
        ks = set(self.ks)
        if self.k_fraction:
            ks.add(max(1, round(width * self.k_fraction)))
        return sorted(k for k in ks if k < width)


#: the ``--quick`` preset: small shapes, few repeats, short training runs (about a minute on 2 cores
#: without the parse suite; the parse suite alone: about half a minute)
QUICK = dict(
    quick=True,
    batches=(10, 100),
    widths=(500, 2048),
    ks=(20,),
    min_repeats=3,
    max_repeats=10,
    budget_s=0.5,
    train_limit=2000,
    train_epochs=1,
    parse_limit=100,
    parse_epochs=1,
    parse_decode_repeats=3,
    tagger_limit=200,
    tagger_epochs=1,
    tagger_hidden=64,
    tagger_decode_repeats=3,
    dist_processes=(1, 2),
    dist_steps=5,
)


def make_config(quick: bool = False, **options: Any) -> BenchConfig:
    """The full or quick preset, with every option that is not None put over it."""
    known = {f.name for f in fields(BenchConfig)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown bench options: {', '.join(sorted(unknown))}")
    base = BenchConfig(**QUICK) if quick else BenchConfig()
    given = {name: tuple(dict.fromkeys(v)) if isinstance(v, (list, tuple)) else v  # repeated values once
             for name, v in options.items() if v is not None}
    return replace(base, **given)

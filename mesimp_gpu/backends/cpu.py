"""The fast CPU backend: a C++ kernel (``cpu_kernels.cpp``) built at first use and cached.

Per-example meProp runs as one call that selects, counts meSimp hits and computes both products:

- selection: a threshold selection per row in O(n) on the magnitudes' bit patterns (the maxima of
  ``k`` strided groups bound the k-th largest magnitude from below; among the candidates at or above
  that bound a radix select on the key bytes, finished by ``nth_element``, finds it exactly), ties
  to the lower column; NaN/inf are detected in the same pass;
- ``dx = G_k @ W``: one task per example, a weighted sum of its ``k`` rows of ``W``;
- ``dW = G_k.T @ x``: the kept ``(example, value)`` pairs are bucketed by column, and one task per
  output row sums its bucket's rows of ``x``. Every row of ``dW`` is written by one thread in a fixed
  order, so ``dW`` is bit-identical for any thread count;
- ``need_dx=False`` (the first layer, whose input needs no gradient) skips ``dx``.

Above a kept fraction of :data:`DENSE_PRODUCTS_FRACTION` (``k > out / 4``: meSimp's k = 160 on a
layer it has shrunk to a few hundred) the sparse loops lose to BLAS, so the kernel only selects and
the two products are GEMMs on the masked gradient (measured crossover between 0.2 and 0.3 at widths
180 to 2048). Those GEMMs are deterministic run to run at a fixed thread count.

Both loops run on torch's intra-op thread pool (``torch.get_num_threads()``); their tasks, and the
row updates of the lazy optimizers, flush subnormal numbers to zero (a gradient or Adam moment that
shrank below 1.2e-38 would otherwise cost a microcode assist per operation). A ``dW`` of 1 MiB or
more comes from a small pool of recycled, huge-page-advised buffers (a fresh one costs more in page
faults than the sparse products), and from 8 MiB on it is written with streaming stores.

The kernel also holds the lazy optimizers' in-place row updates (``sgd_rows_``, ``adam_rows_``,
``adagrad_rows_``: one pass per row, all cores) and their union of touched rows.

Building. The kernels are compiled by :func:`torch.utils.cpp_extension.load_inline` (``-O3``) for one
instruction-set level, :data:`ARCH_ENV` (``MESIMP_CPU_ARCH``): ``native`` (the default: this CPU's
``-march=native``), ``x86-64-v3`` (AVX2 and FMA), ``x86-64-v4`` (AVX-512) or ``armv8-a`` (NEON), so
that the AVX2 code is built, tested and timed on an AVX-512 machine too. ``cpu_simd.h`` picks the
vector width and register tiles from the level's predefined macros. Each build has its own folder
under the torch extensions root (``TORCH_EXTENSIONS_DIR``, else torch's default), named after the
level and a hash of the sources, the flags, the CPU's features (for ``native``), the torch build
(version, commit, include paths) and the Python ABI: two virtual environments never rebuild each
other's extension, and a cache shared between machines never loads code built for another CPU. The
first build of a folder prints one line (what it builds, roughly how long). Without a working compiler
(or ninja), or when the build fails, the constructor raises :class:`BackendUnavailable` with the
compiler's first error, which ``auto`` logs before falling back to the ``torch`` backend.

Unified top-k is the shared :meth:`~mesimp_gpu.backends.base.Backend.unified_backward` (two BLAS
GEMMs on ``G[:, S]`` and ``W[S]``) with the kernel's selection, and its :meth:`CpuBackend.scatter_rows`
writes ``dW`` row by row (the ``k`` products, zeros elsewhere) in parallel instead of zero-filling all
of ``dW`` first. Tensors the kernel does not handle (other devices, half precision) go to the
portable code: the ``torch`` backend's, or the base class's row updates.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from mesimp_gpu.backends.base import Backend, bincount_hits, check_finite, check_k, masked_gradient
from mesimp_gpu.backends.torch_backend import TorchBackend
from mesimp_gpu.machine import cpu_flags

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
#: the extension's translation unit and the headers it includes (all hashed into the build's name)
SOURCES = [HERE / "cpu_kernels.cpp", HERE / "cpu_simd.h", HERE / "cpu_core.h"]
FUNCTIONS = ["topk_indices", "sparse_backward", "topk_backward", "scatter_rows", "union_rows", "lazy_sgd_",
             "lazy_adam_", "lazy_adagrad_", "simd_info"]
#: flags of every level; -fvisibility=hidden keeps two levels' builds in one process apart
CFLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp", "-fvisibility=hidden"]
NATIVE_DTYPES = (torch.float32, torch.float64)
#: kept fraction k / out above which the products are BLAS GEMMs on the masked gradient
DENSE_PRODUCTS_FRACTION = 0.25

#: the environment variable that chooses the instruction-set level of the build
ARCH_ENV = "MESIMP_CPU_ARCH"
DEFAULT_ARCH = "native"


@dataclass(frozen=True)
class ArchLevel:
    """One instruction-set level the kernels can be built for."""

    machine: str | None  # platform.machine() it runs on (None: any)
    flags: tuple[str, ...]  # compiler flags that select it
    needs: tuple[str, ...]  # CPU feature flags (/proc/cpuinfo) it executes with
    what: str  # for people


#: level name -> how it is built and what it needs; ``native`` is whatever the compiler finds here
ARCH_LEVELS: dict[str, ArchLevel] = {
    "native": ArchLevel(None, ("-march=native",), (), "this CPU's instruction set"),
    "x86-64-v3": ArchLevel("x86_64", ("-march=x86-64-v3",), ("avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"),
                           "AVX2 and FMA"),
    "x86-64-v4": ArchLevel("x86_64", ("-march=x86-64-v4",),
                           ("avx2", "fma", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"), "AVX-512"),
    "armv8-a": ArchLevel("aarch64", ("-march=armv8-a",), (), "NEON"),
}

#: a build's rough duration on 2 cores, for the line printed before it
BUILD_MINUTES = "1-2 minutes"
#: torch takes a lock file in the build folder for every load; one older than this was left by a build that
#: was killed, and would make every later load wait for ever
STALE_LOCK_S = 15 * 60


def arch_from_env() -> str:
    """The level :data:`ARCH_ENV` chooses (default ``native``); an unknown name raises :class:`BackendUnavailable`."""
    from mesimp_gpu.backends import BackendUnavailable

    arch = os.environ.get(ARCH_ENV, "").strip() or DEFAULT_ARCH
    if arch not in ARCH_LEVELS:
        raise BackendUnavailable(f"{ARCH_ENV}={arch!r} is not a level the cpu backend knows; choose one of: "
                                 f"{', '.join(ARCH_LEVELS)}")
    return arch


def runnable_levels() -> list[str]:
    """The levels of :data:`ARCH_LEVELS` this machine can execute, ``native`` first."""
    machine, flags = platform.machine(), set(cpu_flags())
    return [name for name, level in ARCH_LEVELS.items()
            if level.machine in (None, machine) and all(f in flags for f in level.needs)]


def check_arch(arch: str) -> ArchLevel:
    """The level called ``arch``; :class:`BackendUnavailable` when it is unknown or this CPU cannot run it."""
    from mesimp_gpu.backends import BackendUnavailable

    level = ARCH_LEVELS.get(arch)
    if level is None:
        raise BackendUnavailable(f"cpu backend level {arch!r} is unknown ({ARCH_ENV} or --cpu-arch); choose one of: "
                                 f"{', '.join(ARCH_LEVELS)}")
    if arch not in runnable_levels():
        missing = [f for f in level.needs if f not in set(cpu_flags())]
        where = f"lacks {', '.join(missing)}" if missing else f"is {platform.machine()}, not {level.machine}"
        raise BackendUnavailable(f"cpu backend level {arch!r} ({level.what}) cannot run here: this CPU {where}; "
                                 f"choose one of: {', '.join(runnable_levels())}")
    return level


def build_key(arch: str) -> str:
    """What the build of ``arch`` depends on, hashed: sources, flags, CPU (native only), torch build, Python."""
    from torch.utils import cpp_extension

    parts = [*(path.read_text() for path in SOURCES), " ".join(CFLAGS + list(ARCH_LEVELS[arch].flags)),
             torch.__version__, str(torch.version.git_version), " ".join(cpp_extension.include_paths()),
             str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)), sys.implementation.cache_tag, platform.machine(),
             os.environ.get("CXX", "c++")]
    if arch == "native":
        parts.append(" ".join(cpu_flags()))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_directory(arch: str) -> tuple[str, Path]:
    """The extension's module name and its own build folder for ``arch`` in this environment."""
    from torch.utils import cpp_extension

    name = f"mesimp_cpu_{arch.replace('-', '_')}_{build_key(arch)}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    return name, root / "mesimp_gpu" / name


def compiler_message(exc: BaseException) -> str:
    """The compiler's first error line (``file:line:col: error: ...``) in a failed build's message, else its
    last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if ": error:" in line or ": fatal error:" in line]
    return (errors or lines or [repr(exc)])[0 if errors else -1]


def clear_stale_lock(folder: Path) -> None:
    """Delete ``folder``'s build lock when it is older than :data:`STALE_LOCK_S`, saying so on stderr."""
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        print(f"mesimp-gpu: removing {lock}, left {age / 60:.0f} minutes ago by a build of the cpu backend that did "
              "not finish", file=sys.stderr, flush=True)
        lock.unlink(missing_ok=True)


def load_kernels(arch: str | None = None) -> ModuleType:
    """Compile (first use in an environment: a minute or two) or load from its folder the C++ kernels for ``arch``
    (default: :func:`arch_from_env`).

    Raises :class:`~mesimp_gpu.backends.BackendUnavailable` when the level cannot run here or building
    fails for any reason (no compiler, no ninja, a broken toolchain), with the compiler's message.
    """
    from mesimp_gpu.backends import BackendUnavailable  # the registry imports this module lazily

    from torch.utils import cpp_extension

    arch = arch or arch_from_env()
    level = check_arch(arch)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BackendUnavailable(f"backend 'cpu' needs a C++ compiler to build its kernels; {compiler!r} was not found")
    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable("backend 'cpu' needs ninja to build its kernels (pip install ninja)")
    name, folder = build_directory(arch)
    if not (folder / f"{name}.so").exists():
        print(f"mesimp-gpu: building the cpu backend's kernels for {arch} ({level.what}) with {compiler} in {folder}; "
              f"this takes {BUILD_MINUTES} once per environment and level", file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(folder)
    start = time.perf_counter()
    try:
        module = cpp_extension.load_inline(
            name=name,
            cpp_sources=[SOURCES[0].read_text()],
            functions=FUNCTIONS,
            extra_cflags=CFLAGS + list(level.flags),
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(HERE)],
            build_directory=str(folder),
            verbose=False,
        )
    except Exception as exc:  # any failure to build means "not available here"
        raise BackendUnavailable(
            f"backend 'cpu' could not build its kernels for {arch} with the C++ compiler {compiler!r} "
            f"({type(exc).__name__}: {compiler_message(exc)}); use backend 'torch' instead"
        ) from exc
    log.info("cpu kernels for %s ready in %.1f s", arch, time.perf_counter() - start)
    return module


class CpuBackend(Backend):
    """Fused, multi-threaded per-example meProp and row updates on CPU; see the module docstring."""

    name = "cpu"

    def __init__(self, arch: str | None = None) -> None:
        """Build or load the kernels for level ``arch`` (default: ``MESIMP_CPU_ARCH``, else ``native``); with a
        level given, the backend's registry name is ``cpu@<level>``."""
        if arch is not None:
            self.name = f"cpu@{arch}"
        self.arch = arch or arch_from_env()
        self.ops = load_kernels(self.arch)
        self.portable = TorchBackend()

    @staticmethod
    def handles(*tensors: Tensor) -> bool:
        """True when every tensor is a CPU float32/float64 tensor of one dtype (what the kernel takes)."""
        dtype = tensors[0].dtype
        return dtype in NATIVE_DTYPES and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)

    @classmethod
    def handles_rows(cls, p: Tensor, grad: Tensor, *state: Tensor | None) -> bool:
        """True when the row-update kernels can update ``p`` in place: ``p``, ``grad`` and the optimizer
        state contiguous CPU float32/float64 tensors of one dtype and shape."""
        tensors = [p, grad, *(t for t in state if t is not None)]
        return (
            p.dim() >= 1
            and cls.handles(*tensors)
            and all(t.shape == p.shape and t.is_contiguous() for t in tensors)
        )

    def topk_indices(self, g: Tensor, k: int) -> Tensor:
        if not self.handles(g):
            return self.portable.topk_indices(g, k)
        k = check_k(k, g.shape[1])
        idx, finite = self.ops.topk_indices(g.contiguous(), k)
        if not finite:
            check_finite(g)  # the kernel saw NaN or inf: raises InvalidGradientError
        return idx

    def sparse_backward(
        self, g: Tensor, idx: Tensor, x: Tensor, weight: Tensor, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        if not self.handles(g, x, weight):
            return self.portable.sparse_backward(g, idx, x, weight, need_dx)
        return self.ops.sparse_backward(
            g.contiguous(), idx.contiguous(), x.contiguous(), weight.contiguous(), None, need_dx
        )

    def topk_backward(
        self, g: Tensor, x: Tensor, weight: Tensor, k: int, hits: Tensor | None = None, need_dx: bool = True
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        if not self.handles(g, x, weight):
            return self.portable.topk_backward(g, x, weight, k, hits, need_dx)
        k = check_k(k, g.shape[1])
        if k > DENSE_PRODUCTS_FRACTION * g.shape[1]:
            return self.masked_products(g, x, weight, k, hits, need_dx)
        dx, dw, idx, finite = self.ops.topk_backward(g.contiguous(), x.contiguous(), weight.contiguous(), k, hits,
                                                     need_dx)
        if not finite:
            check_finite(g)  # the kernel saw NaN or inf: raises InvalidGradientError
        return dx, dw, idx

    def masked_products(
        self, g: Tensor, x: Tensor, weight: Tensor, k: int, hits: Tensor | None, need_dx: bool
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Per-example meProp for a large kept fraction: the kernel's selection, then two GEMMs on ``G_k``."""
        idx = self.topk_indices(g, k)
        if hits is not None:
            bincount_hits(hits, idx)
        g_k = masked_gradient(g, idx)  # (B, out)
        return (g_k.mm(weight) if need_dx else None), g_k.t().mm(x), idx

    def scatter_rows(self, src: Tensor, rows: Tensor, n_rows: int) -> Tensor:
        if not self.handles(src):
            return super().scatter_rows(src, rows, n_rows)
        return self.ops.scatter_rows(src.contiguous(), rows.contiguous(), n_rows)

    def union_rows(self, pending: list[Tensor], n_rows: int) -> Tensor:
        if not all(t.device.type == "cpu" and t.dtype == torch.int64 for t in pending):
            return super().union_rows(pending, n_rows)
        return self.ops.union_rows(pending, n_rows)

    def sgd_rows_(
        self,
        p: Tensor,
        grad: Tensor,
        rows: Tensor | None,
        lr: float,
        clip: float | None = None,
        momentum: float = 0.0,
        momentum_buffer: Tensor | None = None,
    ) -> None:
        if not self.handles_rows(p, grad, momentum_buffer):
            return super().sgd_rows_(p, grad, rows, lr, clip, momentum, momentum_buffer)
        # the kernel reads clip <= 0 as "no clipping"
        self.ops.lazy_sgd_(p, grad, _kernel_rows(rows), lr, clip or 0.0, momentum, momentum_buffer)

    def adam_rows_(
        self,
        p: Tensor,
        grad: Tensor,
        rows: Tensor | None,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        step: float,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        clip: float | None = None,
    ) -> None:
        if not self.handles_rows(p, grad, exp_avg, exp_avg_sq):
            return super().adam_rows_(p, grad, rows, exp_avg, exp_avg_sq, step, lr, betas, eps, clip)
        self.ops.lazy_adam_(p, grad, exp_avg, exp_avg_sq, _kernel_rows(rows), lr, betas[0], betas[1], eps, step,
                            clip or 0.0)

    def adagrad_rows_(
        self,
        p: Tensor,
        grad: Tensor,
        rows: Tensor | None,
        state_sum: Tensor,
        lr: float,
        eps: float,
        clip: float | None = None,
    ) -> None:
        if not self.handles_rows(p, grad, state_sum):
            return super().adagrad_rows_(p, grad, rows, state_sum, lr, eps, clip)
        self.ops.lazy_adagrad_(p, grad, state_sum, _kernel_rows(rows), lr, eps, clip or 0.0)


def level_backend(arch: str) -> CpuBackend:
    """The cpu backend built for level ``arch``: the registry's ``cpu@<arch>``, loaded once per process. The
    registry's ``cpu`` is the level of ``MESIMP_CPU_ARCH``; these let tests and the bench run several levels
    side by side (each level is its own extension module, so they coexist in one process)."""
    from mesimp_gpu.backends import load_backend

    backend = load_backend(f"cpu@{arch}")
    assert isinstance(backend, CpuBackend)
    return backend


def _kernel_rows(rows: Tensor | None) -> Tensor | None:
    """``rows`` as the row-update kernels take them: a contiguous int64 vector (None: every row)."""
    return None if rows is None else rows.contiguous()

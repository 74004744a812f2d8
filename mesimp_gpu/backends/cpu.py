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
``adagrad_rows_``: one pass per row, all cores) and their union of touched rows. It is compiled
with ``-O3 -march=native`` by :func:`torch.utils.cpp_extension.load_inline` into the torch extensions
directory (``TORCH_EXTENSIONS_DIR``); its name carries a hash of the source and of the CPU's feature
flags, so a cache shared between machines never loads code built for another CPU. Without a working
compiler (or ninja) the constructor raises :class:`BackendUnavailable`, which ``auto`` logs before
falling back to the ``torch`` backend.

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
import shutil
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from mesimp_gpu.backends.base import Backend, bincount_hits, check_finite, check_k, masked_gradient
from mesimp_gpu.backends.torch_backend import TorchBackend
from mesimp_gpu.machine import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FUNCTIONS = ["topk_indices", "sparse_backward", "topk_backward", "scatter_rows", "union_rows", "lazy_sgd_",
             "lazy_adam_", "lazy_adagrad_"]
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp"]
NATIVE_DTYPES = (torch.float32, torch.float64)
#: kept fraction k / out above which the products are BLAS GEMMs on the masked gradient
DENSE_PRODUCTS_FRACTION = 0.25


def load_kernels() -> ModuleType:
    """Compile (first use, tens of seconds) or load from cache the C++ kernels.

    Raises :class:`~mesimp_gpu.backends.BackendUnavailable` when building fails for any reason
    (no compiler, no ninja, a broken toolchain).
    """
    from mesimp_gpu.backends import BackendUnavailable  # the registry imports this module lazily

    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BackendUnavailable(f"backend 'cpu' needs a C++ compiler to build its kernels; {compiler!r} was not found")
    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable("backend 'cpu' needs ninja to build its kernels (pip install ninja)")
    source = SOURCE.read_text()
    digest = hashlib.sha256((source + " ".join(cpu_flags()) + " ".join(CFLAGS)).encode()).hexdigest()[:12]
    start = time.perf_counter()
    try:
        module = cpp_extension.load_inline(
            name=f"mesimp_cpu_kernels_{digest}",
            cpp_sources=[source],
            functions=FUNCTIONS,
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # any failure to build means "not available here"
        last_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise BackendUnavailable(
            f"backend 'cpu' could not build its kernels with the C++ compiler {compiler!r} "
            f"({type(exc).__name__}: {last_line}); use backend 'torch' instead"
        ) from exc
    log.info("cpu kernels ready in %.1f s", time.perf_counter() - start)
    return module


class CpuBackend(Backend):
    """Fused, multi-threaded per-example meProp and row updates on CPU; see the module docstring."""

    name = "cpu"

    def __init__(self) -> None:
        self.ops = load_kernels()
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


def _kernel_rows(rows: Tensor | None) -> Tensor | None:
    """``rows`` as the row-update kernels take them: a contiguous int64 vector (None: every row)."""
    return None if rows is None else rows.contiguous()

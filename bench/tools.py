"""Why the ``cpu`` backend is C++, and where its time goes.

``numba_topk_backward`` is the ``cpu`` backend's algorithm (threshold selection on the magnitudes'
bit patterns, ties to the lower column; ``dx`` by examples; ``dW`` by output rows from column
buckets) in Numba's parallel JIT. :func:`main` times it side by side with the C++ kernel and with
the two dense GEMMs, checks both against the float64 reference, profiles the C++ kernel's parts
(:func:`profile`), and writes ``bench/results/cpu-tools-<time>.json``. Numba is not a dependency of
the package::

    pip install numba
    python -m mesimp_gpu.bench.tools [--threads N]

``--profile-only`` leaves Numba out and profiles the kernel's parts at each ``--cpu-arch`` level side by
side (the cpu backend built for that level, ``cpu@<level>``)::

    python -m mesimp_gpu.bench.tools --profile-only --threads 2 --cpu-arch x86-64-v3 --cpu-arch x86-64-v4
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesimp_gpu.backends import load_backend
from mesimp_gpu.backends.cpu import ARCH_LEVELS
from mesimp_gpu.bench.common import relative_error
from mesimp_gpu.bench.config import BenchConfig
from mesimp_gpu.bench.timing import CpuClock, measure
from mesimp_gpu.io import write_json
from mesimp_gpu.machine import describe

#: (batch, width, k) of the comparison: the MNIST hidden layer and the wide layer at a small and a large k
SHAPES = [(100, 500, 20), (100, 4096, 20), (100, 4096, 128)]


def numba_kernels() -> Any:
    """Compile the Numba version (seconds); raises ImportError without numba."""
    import numba
    from numba import njit, prange

    @njit(inline="always")
    def select_row(keys, k, out):  # pragma: no cover - compiled
        n = keys.shape[0]
        gmax = keys[:k].copy()
        for r in range(k, n, k):
            for c in range(min(k, n - r)):
                gmax[c] = max(gmax[c], keys[r + c])
        lower = gmax.min()
        cand = np.empty(n, np.int64)
        count = 0
        for j in range(n):
            cand[count] = j
            count += keys[j] >= lower
        ck = np.empty(count, keys.dtype)
        for i in range(count):
            ck[i] = keys[cand[i]]
        kth = np.partition(ck, count - k)[count - k]
        ties = k
        for i in range(count):
            ties -= ck[i] > kth
        kept = 0
        for i in range(count):
            key = keys[cand[i]]
            if key > kth or (key == kth and ties > 0):
                ties -= key == kth
                out[kept] = cand[i]
                kept += 1

    @njit(parallel=True)
    def topk_backward(g, x, w, k):  # pragma: no cover - compiled
        rows, n = g.shape
        n_in = x.shape[1]
        keys = g.view(np.uint32) & np.uint32(0x7FFFFFFF)
        idx = np.empty((rows, k), np.int64)
        dx = np.zeros((rows, n_in), g.dtype)
        for b in prange(rows):
            select_row(keys[b], k, idx[b])
            for t in range(k):
                c, row = g[b, idx[b, t]], w[idx[b, t]]
                for i in range(n_in):
                    dx[b, i] += c * row[i]
        start = np.zeros(n + 1, np.int64)
        for p in range(rows * k):
            start[idx.ravel()[p] + 1] += 1
        for j in range(n):
            start[j + 1] += start[j]
        example, value, fill = np.empty(rows * k, np.int64), np.empty(rows * k, g.dtype), start[:-1].copy()
        for b in range(rows):
            for t in range(k):
                j = idx[b, t]
                example[fill[j]], value[fill[j]] = b, g[b, j]
                fill[j] += 1
        dw = np.zeros_like(w)
        for j in prange(n):
            for p in range(start[j], start[j + 1]):
                c, row = value[p], x[example[p]]
                for i in range(n_in):
                    dw[j, i] += c * row[i]
        return dx, dw, idx

    numba.set_num_threads(torch.get_num_threads())
    return topk_backward


def numba_topk_backward(kernel: Any, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, k: int):
    """``(dx, dW, idx)`` of float32 CPU tensors ``g [B, out]``, ``x [B, in]``, ``w [out, in]`` via Numba."""
    return tuple(torch.from_numpy(a) for a in kernel(g.numpy(), x.numpy(), w.numpy(), k))


def profile(batch: int, width: int, k: int, repeats: int = 15, backend: str = "cpu") -> dict[str, dict[str, float]]:
    """Median seconds of the cpu kernel's parts at one shape (``backend``: ``cpu`` or ``cpu@<level>``), with
    warm caches and after evicting them, and the process's CPU seconds per call with warm caches (all
    threads together: on a busy machine the wall time also holds the waits for descheduled workers).

    ``cold`` writes 256 MiB before every call, as a training step does between two backward passes
    of a layer (the other layers and the optimizer run in between).
    """
    ops = load_backend(backend).ops
    g, x, w = torch.randn(batch, width), torch.randn(batch, width), torch.randn(width, width)
    idx, _ = ops.topk_indices(g, k)
    evict = torch.empty(64 * 2**20)
    parts = {
        "select": lambda: ops.topk_indices(g, k),
        "products_dw_only": lambda: ops.sparse_backward(g, idx, x, w, None, False),
        "products_dx_dw": lambda: ops.sparse_backward(g, idx, x, w, None, True),
        "fused_select_dx_dw": lambda: ops.topk_backward(g, x, w, k, None, True),
        "dense_dx_gemm": lambda: g.mm(w),
        "dense_dw_gemm": lambda: g.t().mm(x),
        "read_w_once": lambda: w.sum(),
    }
    out: dict[str, dict[str, float]] = {"warm": {}, "cold": {}, "warm_cpu": {}}
    for name, fn in parts.items():
        fn()
        for state in ("warm", "cold"):
            samples, cpu = [], []
            for _ in range(repeats):
                if state == "cold":
                    evict.fill_(1.0)
                start_cpu = time.process_time()
                samples.append(CpuClock().per_call(fn, 1))
                cpu.append(time.process_time() - start_cpu)
            out[state][name] = float(np.median(samples))
            if state == "warm":
                out["warm_cpu"][name] = float(np.median(cpu))
    return out


def profile_levels(threads: int, levels: list[str], out_dir: Path) -> Path:
    """The kernel's parts at every shape of :data:`SHAPES` and every level, side by side; returns the results file."""
    torch.set_num_threads(threads)
    backends = {level: load_backend(f"cpu@{level}") for level in levels}
    rows = [{"batch": batch, "width": width, "k": k, "level": level, "simd": backend.ops.simd_info(),
             "profile_cpp_s": profile(batch, width, k, backend=backend.name)}
            for batch, width, k in SHAPES for level, backend in backends.items()]
    created = datetime.now(timezone.utc)
    path = out_dir / f"cpu-profile-{created:%Y%m%d-%H%M%S}.json"
    write_json(path, {"created": created.isoformat(timespec="seconds"), "threads": threads,
                      "load_average": [round(v, 2) for v in os.getloadavg()], "machine": describe(), "rows": rows})
    return path


def compare(threads: int, out_dir: Path) -> Path:
    """Time dense GEMMs, the C++ kernel and the Numba version side by side; returns the results file."""
    torch.set_num_threads(threads)
    cpu, reference = load_backend("cpu"), load_backend("reference")
    kernel = numba_kernels()
    plan = BenchConfig(budget_s=3.0, min_repeats=10)
    rows = []
    for batch, width, k in SHAPES:
        g, x, w = torch.randn(batch, width), torch.randn(batch, width), torch.randn(width, width)
        expected = reference.topk_backward(g, x, w, k)
        errors = {}
        for name, result in (("cpp", cpu.topk_backward(g, x, w, k)), ("numba", numba_topk_backward(kernel, g, x, w, k))):
            assert torch.equal(result[2], expected[2]), f"{name} selected other indices than the reference"
            errors[name] = max(relative_error(result[0], expected[0]), relative_error(result[1], expected[1]))
        dense, cpp, numba = measure([lambda: (g.mm(w), g.t().mm(x)), lambda: cpu.topk_backward(g, x, w, k),
                                     lambda: numba_topk_backward(kernel, g, x, w, k)], CpuClock(), plan)
        rows.append({"batch": batch, "width": width, "k": k, "dense_gemms_s": dense.median, "cpp_s": cpp.median,
                     "numba_s": numba.median, "cpp_over_numba": numba.median / cpp.median,
                     "cpp_speedup_over_dense": dense.median / cpp.median,
                     "numba_speedup_over_dense": dense.median / numba.median, "max_error": errors,
                     "profile_cpp_s": profile(batch, width, k)})
    created = datetime.now(timezone.utc)
    path = out_dir / f"cpu-tools-{created:%Y%m%d-%H%M%S}.json"
    write_json(path, {"created": created.isoformat(timespec="seconds"), "threads": threads,
                      "machine": describe(), "numba": __import__("numba").__version__, "rows": rows})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"), help="folder for the results file")
    parser.add_argument("--profile-only", action="store_true", help="only the kernel's parts, at each --cpu-arch")
    parser.add_argument("--cpu-arch", action="append", choices=list(ARCH_LEVELS), help="level to profile (repeatable; "
                        "default: native)")
    args = parser.parse_args()
    if args.profile_only:
        path = profile_levels(args.threads, args.cpu_arch or ["native"], args.out_dir)
    else:
        path = compare(args.threads, args.out_dir)
    print(path.read_text())


if __name__ == "__main__":
    main()

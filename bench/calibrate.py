"""CUDA calibration, measured in the same run as the suites, and the roofline it gives.

- copy bandwidth: a device-to-device copy of a large buffer (bytes read + bytes written per second);
- matmul throughput: one large square product in fp32, tf32 and bf16 (TFLOP/s);
- launch: the time per launch of a trivial kernel (a one-element add), queued back to back.

A layer row's *hardware fraction* is the roofline time of the work its method must do at least
(``max(flops / fp32 peak, bytes / copy bandwidth)``) divided by the measured median: 1 means the
hardware could not do it faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mesimp_gpu.bench.config import BenchConfig, Pass, Provider, Suite
from mesimp_gpu.bench.timing import Clock, measure

COPY_BYTES = 1 << 30  # 1 GiB: far beyond any L2 cache
MATMUL_SIZE = 8192  # square matmul: large enough to reach the peak on today's GPUs
PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 tensor cores for float32 matmuls, restoring the setting afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def calibrate(config: BenchConfig, device: torch.device, clock: Clock) -> dict[str, Any]:
    """Copy bandwidth (GB/s), matmul TFLOP/s per precision and launch time (microseconds) of ``device``."""
    src = torch.randn(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    copy = measure([lambda: dst.copy_(src)], clock, config)[0]
    del src, dst
    result: dict[str, Any] = {"copy_gbs": 2 * COPY_BYTES / copy.median / 1e9}
    for name, dtype in PRECISIONS.items():
        a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
        b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
        with tf32(name == "tf32"):
            stats = measure([lambda: a @ b], clock, config)[0]
        result[f"matmul_{name}_tflops"] = 2 * MATMUL_SIZE**3 / stats.median / 1e12
    one = torch.zeros(1, device=device)
    result["launch_us"] = measure([lambda: one.add_(1)], clock, config)[0].median * 1e6
    return result


def roofline_seconds(row: dict[str, Any], calibration: dict[str, Any]) -> float | None:
    """Least time the hardware needs for the work of a layer row's method (None for other rows).

    Dense: ``4 B n^2`` FLOPs and reading ``G, x, W``, writing ``dx, dW``. meProp (any selection, and
    the prior art, which computes the same result): ``4 B k n`` FLOPs, reading ``G``, ``x`` and the
    touched rows of ``W`` (at most ``min(B k, n)``; ``k`` for unified), writing ``dx`` and the dense
    ``dW``. Forward+backward adds the forward GEMM (``2 B n^2`` FLOPs, reading ``x, W``, writing ``y``).
    """
    if row.get("suite") != Suite.LAYER.value or row.get("status") != "ok":
        return None
    batch, n, size = row["batch"], row["width"], 4  # float32
    if row["provider"] == Provider.DENSE.value:
        flops, touched = 4.0 * batch * n * n, n
    else:
        k = row["k"]
        flops = 4.0 * batch * k * n
        touched = k if row["provider"] == Provider.UNIFIED.value else min(batch * k, n)
    moved = (3 * batch * n + touched * n + n * n) * size  # G, x, dx; W rows read; dW written
    if row["pass"] == Pass.FORWARD_BACKWARD.value:
        flops += 2.0 * batch * n * n
        moved += (2 * batch * n + n * n) * size
    return max(flops / (calibration["matmul_fp32_tflops"] * 1e12), moved / (calibration["copy_gbs"] * 1e9))


def add_hardware_fractions(rows: list[dict[str, Any]], calibration: dict[str, Any]) -> None:
    """Set ``hw_fraction`` (roofline time / measured median) on every timed layer row, in place."""
    for r in rows:
        bound = roofline_seconds(r, calibration)
        if bound is not None:
            r["roofline_s"] = bound
            r["hw_fraction"] = bound / r["median_s"]

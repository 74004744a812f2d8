"""Traffic model of the Triton kernels: the bytes each launch must move and the FLOPs it must do.

For every kernel of a Triton meProp backward the model counts the DRAM bytes read and written and the
floating-point operations, under the access pattern the launcher sets up:

- top-k selection (:mod:`mesimp_gpu.kernels.topk`, its plan for ``(n, k)``): a resident row reads
  ``G`` once; two stages read ``G`` once, write and re-read the ``C k`` candidates per row
  (``C = ceil(n / 4096)``); a streamed row reads ``G`` five times. Each row writes ``k`` values and
  ``k`` int64 indices, and with hits ``k`` int64 atomics.
- ``dx`` gather (:mod:`mesimp_gpu.kernels.gather`): the grid runs all examples of one 128-column tile
  of ``W`` back to back, so a tile's rows (``n x 128`` elements, 4 MB at n = 8192 in fp32) stay in L2
  and each distinct touched row of ``W`` (at most ``min(B k, n)``) is read from DRAM once; reads
  ``idx``/``vals``, writes ``dx``; ``2 B k in`` FLOPs.
- ``dW`` rows (:mod:`mesimp_gpu.kernels.rows`): the stable sort of the ``B k`` kept indices (torch's
  radix sort, about four passes over keys and values), then the write-only kernel: all rows of one
  column tile of ``x`` run back to back, so ``x`` is read once from DRAM; writes all of ``dW`` once;
  ``2 B k in`` FLOPs.
- ``db`` (``g.sum(0)`` in the layer): reads ``G`` once.
- column scores (unified): read ``G`` once, write the partial sums.

The predicted time of a launch is ``max(bytes / copy bandwidth, FLOPs / fp32 peak)`` plus the
calibrated launch time; a row's prediction sums its launches. The suites attach the model's totals to
their Triton rows (``model_read_bytes``, ``model_write_bytes``, ``model_flops``, ``model_launches``);
:func:`traffic_section` divides by the measured median and the calibration of the same run (achieved
bandwidth as a fraction of the calibrated copy bandwidth, predicted against measured time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

INDEX_BYTES = 8  # int64 indices, hit counters and segment pointers
SORT_PASSES = 4  # torch's radix sort of int64 keys with int64 values: about four read+write passes


class Traffic(NamedTuple):
    """DRAM bytes read and written, FLOPs and kernel launches of one or more launches."""

    read: float = 0.0
    write: float = 0.0
    flops: float = 0.0
    launches: int = 0

    def __add__(self, other: object) -> Traffic:
        if not isinstance(other, Traffic):
            return NotImplemented
        return Traffic(*(a + b for a, b in zip(self, other, strict=True)))

    def fields(self) -> dict[str, float]:
        """The row fields the suites attach."""
        return {"model_read_bytes": self.read, "model_write_bytes": self.write, "model_flops": self.flops,
                "model_launches": self.launches}


def selection(batch: int, n: int, k: int, size: int = 4, hits: bool = True) -> Traffic:
    """Row-wise top-k of ``G`` ``[B, n]`` (``size`` bytes per element) by the Triton selection kernel."""
    from mesimp_gpu.kernels import topk  # Triton is only needed where Triton rows exist

    out = batch * k * (size + INDEX_BYTES) + (batch * k * INDEX_BYTES if hits else 0)
    plan = topk.plan(n, k)
    if plan.two_stage:
        candidates = batch * math.ceil(n / plan.chunk) * k * (size + INDEX_BYTES)
        return Traffic(read=batch * n * size + candidates, write=candidates + out, launches=2)
    passes = 1 if plan.resident else 5  # a streamed row: four histogram passes and the compaction
    return Traffic(read=passes * batch * n * size, write=out, launches=1)


def gather_dx(batch: int, n: int, k: int, n_in: int, size: int = 4) -> Traffic:
    """``dx = G_k W`` by the gather kernel: each distinct touched row of ``W`` ``[n, in]`` read once."""
    rows = min(batch * k, n)
    return Traffic(read=batch * k * (size + INDEX_BYTES) + rows * n_in * size, write=batch * n_in * size,
                   flops=2.0 * batch * k * n_in, launches=1)


def rows_dw(batch: int, n: int, k: int, n_in: int, size: int = 4) -> Traffic:
    """``dW = G_k^T x`` (``[n, in]``): the sort into column segments, then the write-only row kernel."""
    entries = batch * k
    sort = Traffic(read=SORT_PASSES * entries * 2 * INDEX_BYTES, write=SORT_PASSES * entries * 2 * INDEX_BYTES,
                   launches=SORT_PASSES)
    segments = Traffic(read=entries * (INDEX_BYTES + size), write=entries * size + (n + 1) * INDEX_BYTES, launches=3)
    kernel = Traffic(read=entries * (INDEX_BYTES + size) + (n + 1) * INDEX_BYTES + batch * n_in * size,
                     write=n * n_in * size, flops=2.0 * entries * n_in, launches=1)
    return sort + segments + kernel


def bias(batch: int, n: int, size: int = 4) -> Traffic:
    """``db = sum_b G[b, :]``."""
    return Traffic(read=batch * n * size, write=n * size, flops=float(batch * n), launches=1)


def topk_backward(batch: int, n: int, k: int, n_in: int, size: int = 4, hits: bool = False) -> Traffic:
    """The Triton backward of a per-example meProp layer ``in -> n`` with bias: selection (with ``hits``),
    ``dx``, ``dW`` and ``db``."""
    return (selection(batch, n, k, size, hits) + gather_dx(batch, n, k, n_in, size) + rows_dw(batch, n, k, n_in, size)
            + bias(batch, n, size))


def predicted_seconds(traffic: Traffic, calibration: dict[str, Any]) -> float:
    """``max(bytes / copy bandwidth, FLOPs / fp32 peak) + launches x launch time``."""
    memory = (traffic.read + traffic.write) / (calibration["copy_gbs"] * 1e9)
    compute = traffic.flops / (calibration["matmul_fp32_tflops"] * 1e12)
    return max(memory, compute) + traffic.launches * calibration["launch_us"] * 1e-6


def _row_traffic(r: dict[str, Any]) -> Traffic:
    return Traffic(r["model_read_bytes"], r["model_write_bytes"], r["model_flops"], r["model_launches"])


def traffic_section(doc: dict[str, Any], table: Callable[[Sequence[str], Sequence[Sequence[Any]]], str]) -> str:
    """The report's table of modelled rows of a CUDA run (``table``: the report's markdown table maker);
    empty without a calibration or without such rows."""
    cal = doc["header"].get("calibration")
    rows = [r for r in doc["rows"] if "model_read_bytes" in r and r.get("status") == "ok"]
    if not cal or not rows:
        return ""
    body = []
    for r in rows:
        t = _row_traffic(r)
        achieved = (t.read + t.write) / r["median_s"] / 1e9
        predicted = predicted_seconds(t, cal)
        body.append([r["suite"], r["label"], r.get("pass", "-"), r["batch"], r["width"], r["k"],
                     f"{(t.read + t.write) / 1e6:.3g}", f"{r['median_s'] * 1e6:.1f}", f"{predicted * 1e6:.1f}",
                     f"{r['median_s'] / predicted:.2f}", f"{achieved:.0f}", f"{achieved / cal['copy_gbs']:.2f}"])
    return "\n".join([
        "## Kernel traffic: the model against the measurement (Triton)", "",
        "Modelled DRAM bytes (see bench/traffic.py), the measured median, the model's time "
        "(bytes / copy bandwidth or FLOPs / fp32 peak, plus launches x launch time), measured / predicted, "
        "and the achieved bandwidth (modelled bytes / measured time) as a fraction of the calibrated copy.", "",
        table(["suite", "provider", "pass", "B", "n", "k", "MB", "measured µs", "predicted µs",
               "measured / predicted", "GB/s", "of copy"], body)])

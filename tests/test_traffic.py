"""The bench's traffic model of the Triton kernels (bench/traffic.py) and its report table."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from mesimp_gpu.bench import traffic  # noqa: E402
from mesimp_gpu.bench.report import markdown_table  # noqa: E402
from mesimp_gpu.kernels import topk  # noqa: E402

CALIBRATION = {"copy_gbs": 1000.0, "matmul_fp32_tflops": 50.0, "launch_us": 2.0}


def test_selection_reads_g_once_in_one_or_two_stages() -> None:
    batch, k = 1024, 32
    resident = traffic.selection(batch, 4096, k, hits=False)
    assert resident == traffic.Traffic(read=batch * 4096 * 4, write=batch * k * 12, launches=1)
    wide = traffic.selection(batch, 8192, k, hits=True)
    candidates = batch * 2 * k * 12  # two chunks of MAX_RESIDENT columns, k candidates each
    assert wide.read == batch * 8192 * 4 + candidates and wide.launches == 2
    assert wide.write == candidates + batch * k * 12 + batch * k * 8
    n = 5 * topk.MAX_RESIDENT
    streamed = traffic.selection(8, n, 2 * topk.MAX_RESIDENT, hits=False)
    assert streamed.read == 5 * 8 * n * 4  # four histogram passes and the compaction


def test_backward_sums_its_kernels_and_predicts_the_bound() -> None:
    batch, n, k = 1024, 8192, 32
    total = traffic.topk_backward(batch, n, k, n)
    parts = [traffic.selection(batch, n, k, hits=False), traffic.gather_dx(batch, n, k, n),
             traffic.rows_dw(batch, n, k, n), traffic.bias(batch, n)]
    assert total == sum(parts, traffic.Traffic())
    assert total.flops == 2 * (2.0 * batch * k * n) + batch * n
    assert traffic.rows_dw(batch, n, k, n).write >= n * n * 4  # dW written once, never read
    seconds = traffic.predicted_seconds(total, CALIBRATION)
    memory = (total.read + total.write) / 1e12
    assert seconds == pytest.approx(max(memory, total.flops / 50e12) + total.launches * 2e-6)


def test_report_table_divides_by_the_measurement() -> None:
    model = traffic.selection(1024, 4096, 32, hits=False)
    moved = model.read + model.write
    row = {"suite": "topk", "provider": "topk_indices", "backend": "triton", "label": "topk_indices[triton]",
           "batch": 1024, "width": 4096, "k": 32, "status": "ok", "median_s": moved / 500e9, **model.fields()}
    doc = {"header": {"calibration": CALIBRATION}, "rows": [row]}
    text = traffic.traffic_section(doc, markdown_table)
    assert "| 500 | 0.50 |" in text  # achieved GB/s and its fraction of the 1000 GB/s copy
    predicted = traffic.predicted_seconds(model, CALIBRATION)
    assert f"{row['median_s'] / predicted:.2f}" in text
    assert traffic.traffic_section({"header": {}, "rows": [row]}, markdown_table) == ""  # a CPU run: no table

"""Side-by-side timing of the tagger's LSTM (forward and backward) for the settings of the EWT runs.

All settings run on the same tensors, interleaved round by round (so a busy machine slows them alike),
and the medians with their spread go to ``bench/results/pos/lstm_timing.json`` (``--out`` changes
that). Shapes are those of a typical training batch of ``mesimp-gpu train pos``: 16 sentences of 24
tokens, input 190 (50 + 7 x 20), hidden 500 (56 for the size meSimp kept).
Run: ``python -m mesimp_gpu.bench.lstm_timing``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mesimp_gpu.io import write_json
from mesimp_gpu.lstm import GateSelection, MePropLSTM
from mesimp_gpu.meprop import MePropConfig, MePropMode
from mesimp_gpu.machine import describe

BATCH, STEPS, INPUT = 16, 24, 190
ROUNDS = 15
SETTINGS = {  # name -> (hidden, mode, k, selection, backend)
    "dense": (500, MePropMode.DENSE, 1, GateSelection.PER_GATE, "torch"),
    "meprop k=5 per-gate, cpu": (500, MePropMode.TOPK, 5, GateSelection.PER_GATE, "cpu"),
    "meprop k=5 per-gate, torch": (500, MePropMode.TOPK, 5, GateSelection.PER_GATE, "torch"),
    "meprop k=20 all, cpu": (500, MePropMode.TOPK, 20, GateSelection.ALL, "cpu"),
    "meprop k=5 all, cpu": (500, MePropMode.TOPK, 5, GateSelection.ALL, "cpu"),
    "meSimp size (H=56) k=5 per-gate, cpu": (56, MePropMode.TOPK, 5, GateSelection.PER_GATE, "cpu"),
    "dense H=56": (56, MePropMode.DENSE, 1, GateSelection.PER_GATE, "torch"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/pos/lstm_timing.json"),
                        help="results file (JSON)")
    path = parser.parse_args().out
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(BATCH, STEPS, INPUT)
    lengths = torch.randint(STEPS // 2, STEPS + 1, (BATCH,))
    models = {}
    for name, (hidden, mode, k, selection, backend) in SETTINGS.items():
        models[name] = MePropLSTM(INPUT, hidden, MePropConfig(mode=mode, k=k, backend=backend), selection=selection)
    grad_out = {h: torch.randn(BATCH, STEPS, h) for h in {s[0] for s in SETTINGS.values()}}
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "backward": []} for name in SETTINGS}
    for round_ in range(ROUNDS + 1):  # round 0 warms up (kernel build, allocator)
        for name, model in models.items():
            xi = x.clone().requires_grad_(True)
            start = time.perf_counter()
            out = model(xi, lengths=lengths)
            middle = time.perf_counter()
            out.backward(grad_out[model.output_size])
            end = time.perf_counter()
            if round_:
                times[name]["forward"].append(middle - start)
                times[name]["backward"].append(end - middle)
    dense_backward = statistics.median(times["dense"]["backward"])
    rows = []
    for name, phases in times.items():
        row = {"setting": name}
        for phase, values in phases.items():
            q = statistics.quantiles(values, n=4)
            row[f"{phase}_ms_median"] = 1e3 * statistics.median(values)
            row[f"{phase}_ms_iqr"] = [1e3 * q[0], 1e3 * q[2]]
        row["backward_speedup_vs_dense"] = dense_backward / statistics.median(phases["backward"])
        rows.append(row)
        print(f"{name:40s} forward {row['forward_ms_median']:7.1f} ms  backward {row['backward_ms_median']:7.1f} ms"
              f"  backward speed-up {row['backward_speedup_vs_dense']:.2f}x")
    write_json(path, {
        "shapes": {"batch": BATCH, "steps": STEPS, "input": INPUT}, "rounds": ROUNDS, "threads": 1,
        "machine": describe(), "rows": rows,
    })


if __name__ == "__main__":
    main()

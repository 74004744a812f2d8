"""Print the meSimp tables of README.md from the result files beside this script.

    python bench/results/mnist/summary.py
"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def load(name: str) -> dict | None:
    path = HERE / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def hidden(sizes: list[int]) -> str:
    return "-".join(map(str, sizes[1:-1]))


def spread(values: list[float], digits: int = 2) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def group(prefix: str, seeds: range) -> None:
    runs = [(seed, load(f"{prefix}-s{seed}")) for seed in seeds]
    runs = [(seed, r) for seed, r in runs if r is not None and r["finished"]]
    if not runs:
        return
    print(f"\n{prefix} (seeds {', '.join(str(s) for s, _ in runs)})\n")
    print("| seed | test at best dev | hidden there | final hidden (mean) | final network test | "
          "dense of the final size: final test / at best dev |")
    print("|---|---|---|---|---|---|")
    finals, at_best, ends, layer1, layer2, same_end, same_best = [], [], [], [], [], [], []
    for seed, r in runs:
        f = r["final"]
        same = load(f"{prefix}-s{seed}-same-size")
        sizes = f["sizes"]
        layer1.append(sizes[1])
        layer2.append(sizes[2])
        finals.append(sum(sizes[1:-1]) / 2)
        at_best.append(f["test_acc_at_best_dev"])
        ends.append(f["test_acc_final_network"])
        cell = "-"
        if same is not None and same["finished"]:
            sf = same["final"]
            same_end.append(sf["test_acc_final_network"])
            same_best.append(sf["test_acc_at_best_dev"])
            cell = f"{sf['test_acc_final_network']:.2f} / {sf['test_acc_at_best_dev']:.2f}"
        print(f"| {seed} | {f['test_acc_at_best_dev']:.2f} | {hidden(f['sizes_at_best_dev'])} | "
              f"{hidden(sizes)} ({finals[-1]:.1f}) | {f['test_acc_final_network']:.2f} | {cell} |")
    same = f"{spread(same_end)} / {spread(same_best)}" if same_end else "-"
    print(f"| mean ± sd | {spread(at_best)} | | {spread(layer1, 1)} - {spread(layer2, 1)} ({spread(finals, 1)}) | "
          f"{spread(ends)} | {same} |")


if __name__ == "__main__":
    for prefix in ("mesimp-reference", "mesimp-paper", "mesimp-paper-v1"):
        group(prefix, range(1, 4))

"""The README's reproduction table from committed result files (``mesimp-gpu reproduce``'s own table
function; rows whose runs the command did not make here come from the runs named below).

    python bench/results/reproduce/committed_table.py
"""

import json
import sys
from pathlib import Path

from mesimp_gpu.train.reproduce import Task, markdown_table

RESULTS = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def older_format(results: dict, same_size: dict | None = None) -> dict:
    """Results files written before the final network's score and sizes joined every results document."""
    final = results["final"]
    final.setdefault("sizes_at_best_dev", next((r["sizes"] for r in results["history"]
                                                 if r["step"] == final["best_step"]), None))
    if "test_acc_final_network" not in final:
        end = final.get("test_final_network")
        final["test_acc_final_network"] = end["uas"] if isinstance(end, dict) else end
    if same_size is not None:
        results["same_size"] = same_size["final"]
    return results


def mnist_rows() -> tuple:
    run = RESULTS / "reproduce" / "mnist"
    if (run / "mnist-mesimp.json").is_file():
        return Task.MNIST, load("reproduce/mnist/mnist-dense.json"), load("reproduce/mnist/mnist-mesimp.json")
    return Task.MNIST, older_format(load("mnist/dense-adam.json")), load("mnist/mesimp-paper-s1.json")


def main() -> None:
    rows = [
        mnist_rows(),
        (Task.POS, older_format(load("pos/ewt-dense.json")),
         older_format(load("pos/ewt-mesimp-k5-pergate.json"), load("pos/ewt-dense-h56.json"))),
        (Task.PARSE, older_format(load("parse/ewt-dense.json")), older_format(load("parse/ewt-mesimp-k20.json"))),
    ]
    sys.stdout.write(markdown_table(rows))


if __name__ == "__main__":
    main()

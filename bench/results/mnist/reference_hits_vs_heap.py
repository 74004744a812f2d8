"""How often the vectorised reference rule and the C# heap pick different entries, on real gradients.

    PYTHONPATH=. python bench/results/mnist/reference_hits_vs_heap.py RUN [RUN ...]   (folders of --preset reference runs)
"""
import json, os, sys

import torch

sys.path.insert(0, "tests")  # run from the repository root
from test_mesimp import heap_top
from mesimp_gpu.data.mnist import load_mnist
from mesimp_gpu.models.mlp import MLP
from mesimp_gpu.meprop import MePropConfig, MePropMode
from mesimp_gpu.mesimp import reference_hits

torch.set_num_threads(1)
out = {}
for run in sys.argv[1:]:
    ck = torch.load(f"{run}/checkpoint.pt", weights_only=False)
    sizes = [784, *ck["hidden_sizes"], 10]
    model = MLP(sizes, MePropConfig(MePropMode.TOPK, 160, "torch"), track_hits=True, reference_hits=True)
    model.load_state_dict(ck["model"])
    data = load_mnist(os.environ.get("MESIMP_DATA_DIR")).train
    x, y = data.images[5000:5500], data.labels[5000:5500]
    grads = []
    hooks = [layer.register_full_backward_hook(lambda m, gi, go: grads.append((m, go[0]))) for layer in model.hidden]
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    for layer, g in grads:
        full = torch.zeros(g.shape[0], 500)
        full[:, layer.columns] = g
        rule = reference_hits(g, layer.columns, 160)
        heap = torch.zeros(500, dtype=torch.long)
        rows_differ = 0
        for row in full:
            picks = heap_top(row.tolist(), 160)
            mine = set(torch.nonzero(reference_hits(row[None], torch.arange(500), 160)).flatten().tolist())
            rows_differ += picks != mine
            heap[list(picks)] += 1
        heap_live = heap[layer.columns]
        out.setdefault(run, []).append({
            "width": layer.out_features, "rows": g.shape[0], "rows_with_fewer_than_k_nonzero": int(((g != 0).sum(1) < 160).sum()),
            "rows_where_sets_differ": rows_differ,
            "live_hits_rule": int(rule.sum()), "live_hits_heap": int(heap_live.sum()),
            "neurons_whose_hits_differ": int((rule != heap_live).sum()),
            "max_abs_hit_difference": int((rule - heap_live).abs().max()),
            "neurons_below_10pct_rule": int((rule < 50).sum()), "neurons_below_10pct_heap": int((heap_live < 50).sum()),
        })
print(json.dumps(out, indent=1))

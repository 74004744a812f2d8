"""``mesimp-gpu evaluate``: score a saved model of a training run on held-out data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesimp_gpu.data.mnist import load_mnist
from mesimp_gpu.models.mlp import load_mlp
from mesimp_gpu.train.records import accuracy
from mesimp_gpu.train.settings import resolve_device


@dataclass(frozen=True)
class EvaluateConfig:
    """Every setting of ``mesimp-gpu evaluate``; the CLI options mirror these fields."""

    model: str  # a model.json written by a training run, or its folder
    data_dir: str | None = None  # MNIST folder; default: MESIMP_DATA_DIR, cache, download
    device: str = "cpu"  # cpu, cuda or cuda:N


def evaluate_mnist(config: EvaluateConfig) -> dict[str, Any]:
    """Test accuracy (%) of a saved MNIST model, with its sizes and parameter count."""
    device = resolve_device(config.device)
    net = load_mlp(config.model, device)
    test = load_mnist(config.data_dir).test
    return {
        "test_acc": accuracy(net, test.images.to(device), test.labels.to(device)),
        "images": len(test),
        "sizes": net.sizes,
        "parameters": sum(p.numel() for p in net.parameters()),
    }

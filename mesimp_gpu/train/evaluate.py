"""``mesimp-gpu evaluate``: score a saved model of a training run on held-out data.

The kind of model comes from the ``format`` of its ``model.json``: an MNIST MLP is scored on the MNIST
test images, a tagger on the gold tags and a parser on the gold trees of a CoNLL-U file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesimp_gpu.data.mnist import load_mnist
from mesimp_gpu.models.mlp import MLP_FORMAT, load_mlp
from mesimp_gpu.models.parser import PARSER_FORMAT
from mesimp_gpu.models.saved import read_architecture
from mesimp_gpu.models.tagger import TAGGER_FORMAT
from mesimp_gpu.train.inference import evaluate_parser, evaluate_tagger
from mesimp_gpu.train.records import accuracy
from mesimp_gpu.train.settings import resolve_device


@dataclass(frozen=True)
class EvaluateConfig:
    """Every setting of ``mesimp-gpu evaluate``; the CLI options mirror these fields."""

    model: str  # a model.json written by a training run, or its folder
    data: str | None = None  # CoNLL-U file with gold tags (tagger models) or trees (parser models)
    data_dir: str | None = None  # MNIST folder (MNIST models); default: MESIMP_DATA_DIR, cache, download
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


def evaluate(config: EvaluateConfig) -> tuple[str | None, dict[str, Any]]:
    """``(format, scores)`` of the saved model, scored as its kind requires."""
    kind = read_architecture(config.model)[0].get("format")
    if kind == MLP_FORMAT:
        return kind, evaluate_mnist(config)
    if kind in (PARSER_FORMAT, TAGGER_FORMAT):
        if config.data is None:
            raise ValueError("a tagger or parser is scored on a CoNLL-U file with gold annotations: pass --data "
                             "FILE.conllu")
        score = evaluate_parser if kind == PARSER_FORMAT else evaluate_tagger
        return kind, score(config.model, config.data, config.device)
    raise ValueError(f"{config.model}: models of format {kind!r} cannot be evaluated by this version")

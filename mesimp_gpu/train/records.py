"""A run's records: phase timers, the best-dev tracker, accuracy, and configs as JSON values."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch

PHASES = ("forward", "backward", "update")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PhaseTimer:
    """Accumulates wall seconds per training phase (forward / backward / update)."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The accumulated seconds, then reset to zero."""
        out, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return out


@dataclass
class BestTracker:
    """Dev accuracy per evaluation; the reported test score is the one at the best dev score."""

    best_dev: float = -1.0
    test_at_best: float | None = None
    best_step: int | None = None

    def improved(self, dev: float) -> bool:
        return dev > self.best_dev

    def update(self, dev: float, test: float, step: int) -> None:
        self.best_dev, self.test_at_best, self.best_step = dev, test, step


def jsonable(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (enums by value, paths as strings)."""
    data = asdict(config) if is_dataclass(config) else dict(config)
    return {k: v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v for k, v in data.items()}


@torch.no_grad()
def accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Percentage of ``inputs`` ``[N, ...]`` whose argmax logit equals ``labels`` ``[N]``."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(inputs[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(labels), 1)


def network_line(final: dict[str, Any]) -> str:
    """One line naming the two networks of a run (the ``final`` part of its results): the one scored at the
    best dev, with its hidden sizes, and the one the run ends with, with its hidden sizes and test score."""
    def hidden(sizes: list[int] | None) -> str:
        return "-".join(map(str, sizes[1:-1])) if sizes else "?"

    end = final.get("test_acc_final_network")
    return (f"test accuracy {final['test_acc_at_best_dev']:.2f}% at best dev {final['best_dev_acc']:.2f}% (hidden "
            f"{hidden(final.get('sizes_at_best_dev'))}) | final network: hidden {hidden(final['sizes'])}, test "
            + (f"{end:.2f}%" if end is not None else "not scored"))

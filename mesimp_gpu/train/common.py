"""Run bookkeeping shared by every trainer: devices, seeds, phase timers, machine description,
evaluation with best-dev tracking, checkpoints and results files."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesimp_gpu.io import save_torch

PHASES = ("forward", "backward", "update")


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, checked to exist here; raises ValueError with what to do."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) present")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so that a run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's commit when running from a git tree, else None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Describe the machine and software versions for a results file."""
    import mesimp_gpu

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "mesimp_gpu": mesimp_gpu.__version__,
        "git_commit": git_commit(),
    }
    for module in ("triton", "cupy"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - an optional package that fails to import is simply absent
            info[module] = None
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def jsonable(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (enums by value, paths as strings)."""
    data = asdict(config) if is_dataclass(config) else dict(config)
    return {k: v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v for k, v in data.items()}


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


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`mesimp_gpu.io.save_torch`; a clear error when it is unreadable."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; run without --resume to start fresh")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ValueError(f"checkpoint {path} is unreadable ({exc}); delete it or run without --resume") from exc


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a crash keeps the previous one)."""
    save_torch(path, payload)


def rng_state() -> dict[str, Any]:
    """All random generator states a run depends on."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into ``chunks`` contiguous, nearly equal ``(start, stop)`` pieces (empty ones dropped)."""
    edges = [round(i * n / chunks) for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]

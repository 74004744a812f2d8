"""Run bookkeeping shared by every trainer: devices, seeds, phase timers, machine description,
evaluation with best-dev tracking, checkpoints and results files."""

from __future__ import annotations

import enum
import os
import platform
import random
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mesimp_gpu.backends import get_backend
from mesimp_gpu.io import save_torch, write_json
from mesimp_gpu.meprop import MePropMode
from mesimp_gpu.optim import build_optimizer, clip_elementwise
from mesimp_gpu.plots import plot_history

PHASES = ("forward", "backward", "update")


class Method(str, enum.Enum):
    """Training method of every trainer (meProp applies to the hidden layers, the output layer is dense)."""

    MESIMP = "mesimp"  # meProp top-k plus hit records and prune steps: the model shrinks
    DENSE = "dense"  # full back propagation everywhere
    MEPROP = "meprop"  # per-example top-k (the paper's method)
    UNIFIED = "unified"  # one top-k set per minibatch
    RANDOM = "random"  # k random entries per example (ablation)


#: the meProp mode of each method's hidden layers
METHOD_MODE = {
    Method.MESIMP: MePropMode.TOPK,
    Method.DENSE: MePropMode.DENSE,
    Method.MEPROP: MePropMode.TOPK,
    Method.UNIFIED: MePropMode.UNIFIED,
    Method.RANDOM: MePropMode.RANDOM,
}


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


def check_run_settings(config: Any, positive: dict[str, int]) -> None:
    """Validate what every trainer config shares; ``positive`` names further settings that must be >= 1.

    Raises ValueError naming the CLI option: ``positive`` entries, ``cycle`` >= 0, ``limit`` and
    ``threads`` >= 1 when given, ``lr`` > 0 and ``clip`` > 0 when given.
    """
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if config.cycle < 0:
        raise ValueError(f"--cycle must be at least 0, got {config.cycle}")
    for name, value in (("limit", config.limit), ("threads", config.threads)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    if config.lr <= 0:
        raise ValueError(f"--lr must be positive, got {config.lr}")
    if config.clip is not None and config.clip <= 0:
        raise ValueError(f"--clip must be positive, got {config.clip}")


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


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A per-epoch progress bar; it stays silent when disabled or when stderr is not a terminal
    (a log file gets the per-epoch lines, not thousands of bar redraws)."""
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True)


class Trainer:
    """Bookkeeping every task trainer shares: device and threads, seeded model and optimizer,
    timed update steps, best-dev tracking, checkpoints that resume exactly, and the results core.

    A subclass loads its data, then calls :meth:`start`; it implements :meth:`build_model`
    (``hidden_sizes`` None: the configured sizes) and :attr:`sizes`, and may extend
    :meth:`architecture_state` / :meth:`restore_records` for state outside the ``state_dict``.
    Its config needs ``device``, ``threads``, ``backend``, ``out``, ``seed``, ``optimizer``, ``lr``, ``clip``,
    ``lazy``.
    """

    #: config fields that may differ between a run and its resumption
    resumable_changes: frozenset[str] = frozenset()

    def __init__(self, config: Any) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        get_backend(config.backend, self.device)  # fail now, not in the first backward pass
        self.out = Path(config.out)

    def start(self) -> None:
        """Seed, build the model and optimizer, and reset the run's records."""
        seed_everything(self.config.seed)
        self.model = self.build_model(None)
        self.optimizer = self.new_optimizer()
        self.timer = PhaseTimer(self.device)
        self.best = BestTracker()
        self.history: list[dict[str, Any]] = []
        self.epoch_times: list[dict[str, float]] = []
        self.position = (0, 0)  # (epoch, chunk) of the next piece to train
        self.step = 0
        self.initial_params = self.parameter_count()

    def new_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over the current model (lazy or dense, see :func:`build_optimizer`)."""
        c = self.config
        return build_optimizer(c.optimizer, self.model.parameters(), c.lr, lazy=c.lazy, clip=c.clip)

    def build_model(self, hidden_sizes: list[int] | None) -> torch.nn.Module:
        """The model with this run's settings, on the run's device; ``hidden_sizes`` for a shrunk checkpoint."""
        raise NotImplementedError

    @property
    def sizes(self) -> list[int]:
        """Layer widths ``[input, hidden..., output]`` of the current (possibly shrunk) model."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        """Parameters of the current (possibly shrunk) model."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def update_step(self, compute_loss: Callable[[], torch.Tensor]) -> float:
        """One timed step: forward (``compute_loss``), backward, element-wise clipping and the update."""
        with self.timer.phase("forward"):
            loss = compute_loss()
        with self.timer.phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with self.timer.phase("update"):
            if not self.config.lazy:  # a lazy optimizer clips the rows it updates itself
                clip_elementwise(self.model.parameters(), self.config.clip)
            self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def step_postfix(self, bar: tqdm | None, loss: float) -> None:
        """Advance the bar by one step and show the loss (and the best dev score once there is one)."""
        if bar is None:
            return
        bar.update(1)
        shown = {"loss": f"{loss:.4f}"}
        if self.best.best_step is not None:
            shown["best_dev"] = f"{self.best.best_dev:.2f}"
        bar.set_postfix(shown)

    def record(self, epoch: int, chunk: int, loss: float, dev: float, score_test: Callable[[], float],
               extra: dict[str, Any]) -> dict[str, Any]:
        """Track the best dev score (scoring test only when dev improved); append the history record."""
        test = None
        if self.best.improved(dev):
            test = score_test()
            self.best.update(dev, test, self.step)
            self.on_best()
        entry = {"epoch": epoch, "chunk": chunk, "step": self.step, "train_loss": loss, "dev_acc": dev,
                 "test_acc": test, "sizes": self.sizes, **extra}
        self.history.append(entry)
        return entry

    def on_best(self) -> None:
        """Called when the dev score improved (after test was scored); subclasses save models here."""

    def end_piece(self, epoch: int, chunk: int, pieces: int) -> None:
        """After a piece's evaluation: close the epoch's timing, move the position on, checkpoint."""
        if chunk == pieces - 1:
            self.epoch_times.append({"epoch": epoch, **self.timer.take()})
        self.position = (epoch, chunk + 1) if chunk + 1 < pieces else (epoch + 1, 0)
        self.save()

    def epoch_line(self, epoch: int) -> str:
        """The line printed after each epoch."""
        last = self.history[-1]
        return (f"epoch {epoch + 1}/{self.config.epochs}: loss {last['train_loss']:.4f}  dev {last['dev_acc']:.2f}  "
                f"best dev {self.best.best_dev:.2f} (test {self.best.test_at_best:.2f})  hidden {self.sizes[1:-1]}")

    def results_core(self, task: str, final: bool) -> dict[str, Any]:
        """The part of the results document every task shares: config, machine, history, timing, scores."""
        per_epoch = {p: sum(t[p] for t in self.epoch_times) / max(len(self.epoch_times), 1) for p in PHASES}
        return {
            "task": task,
            "config": jsonable(self.config),
            "machine": machine_info(self.device),
            "finished": final,
            "history": self.history,
            "epoch_seconds": self.epoch_times,
            "final": {
                "best_dev_acc": self.best.best_dev,
                "test_acc_at_best_dev": self.best.test_at_best,
                "best_step": self.best.best_step,
                "last_dev_acc": self.history[-1]["dev_acc"] if self.history else None,
                "sizes": self.sizes,
                "parameters_initial": self.initial_params,
                "parameters_final": self.parameter_count(),
                "mean_epoch_seconds": per_epoch,
            },
        }

    def results(self, final: bool = False) -> dict[str, Any]:
        """The results document (subclasses extend :meth:`results_core`)."""
        raise NotImplementedError

    #: plot title, e.g. "MNIST"
    title = ""

    def epoch_pieces(self, epoch: int) -> Sequence[Any]:
        """The training data of ``epoch`` cut into pieces (one evaluation after each); depends only on
        the seed and the epoch, so a resumed run sees the same pieces."""
        raise NotImplementedError

    def piece_steps(self, piece: Any) -> int:
        """Update steps in one piece (for the progress bar)."""
        raise NotImplementedError

    def train_piece(self, piece: Any, bar: tqdm | None) -> float:
        """Update steps over ``piece``; returns the mean training loss."""
        raise NotImplementedError

    def after_piece(self, epoch: int, chunk: int, last: bool) -> dict[str, Any]:
        """Between a piece's updates and its evaluation (meSimp prunes here); returns history fields."""
        return {}

    def evaluate(self, epoch: int, chunk: int, loss: float, extra: dict[str, Any]) -> dict[str, Any]:
        """Score dev (and test when dev improved) through :meth:`record`."""
        raise NotImplementedError

    def run(self) -> dict[str, Any]:
        """Train from ``self.position`` to the last epoch; returns (and writes) the results."""
        c = self.config
        start_epoch, start_chunk = self.position
        for epoch in range(start_epoch, c.epochs):
            pieces = self.epoch_pieces(epoch)
            first = start_chunk if epoch == start_epoch else 0
            bar = progress_bar(sum(map(self.piece_steps, pieces)), f"epoch {epoch + 1}/{c.epochs}", c.progress)
            bar.update(sum(map(self.piece_steps, pieces[:first])))
            for chunk in range(first, len(pieces)):
                loss = self.train_piece(pieces[chunk], bar)
                extra = self.after_piece(epoch, chunk, last=chunk == len(pieces) - 1)
                self.evaluate(epoch, chunk, loss, extra)
                self.end_piece(epoch, chunk, len(pieces))
            bar.close()
            tqdm.write(self.epoch_line(epoch))
        results = self.results(final=True)
        write_json(self.out / "results.json", results)
        plot_history(self.history, self.out / "curves.png", title=f"{self.title}, {c.method.value}")
        return results

    def architecture_state(self) -> dict[str, Any]:
        """Checkpoint entries that describe the model's shape and records outside its ``state_dict``."""
        return {"hidden_sizes": self.sizes[1:-1]}

    def restore_records(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`architecture_state` saved beyond the sizes (meSimp ``refer`` counters)."""

    def save(self) -> None:
        """Checkpoint and partial results, both written atomically."""
        save_checkpoint(self.checkpoint_path, {
            "config": jsonable(self.config),
            **self.architecture_state(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": self.position,
            "step": self.step,
            "history": self.history,
            "epoch_times": self.epoch_times,
            "timer": self.timer.seconds,
            "best": vars(self.best),
            "rng": rng_state(),
            "initial_params": self.initial_params,
        })
        write_json(self.out / "results.json", self.results())

    def restore(self) -> None:
        """Continue from ``checkpoint.pt`` in ``out``; refuses a checkpoint made with different settings."""
        state = load_checkpoint(self.checkpoint_path)
        mine = jsonable(self.config)
        changed = sorted(k for k in mine if k not in self.resumable_changes and state["config"].get(k) != mine[k])
        if changed:
            raise ValueError(f"checkpoint {self.checkpoint_path} was made with different settings "
                             f"({', '.join(changed)}); use the same options, or another --out")
        self.model = self.build_model(state["hidden_sizes"])
        self.model.load_state_dict(state["model"])
        self.restore_records(state)
        self.optimizer = self.new_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.position, self.step = tuple(state["position"]), state["step"]
        self.history, self.epoch_times = state["history"], state["epoch_times"]
        self.timer.seconds = state["timer"]
        self.best = BestTracker(**state["best"])
        self.initial_params = state["initial_params"]
        set_rng_state(state["rng"])

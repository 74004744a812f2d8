"""Train the MNIST MLP with meSimp, dense back propagation or a meProp variant, as the reference does.

Each epoch is shuffled and cut into ``chunks`` pieces; after each piece the dev set is scored, and
the test set too when dev improved, so the reported test accuracy is the one at the best dev score.
A checkpoint and the results file are rewritten (atomically) after every piece, so ``resume``
continues an interrupted run from its last finished piece and gives the same result as an
uninterrupted run.

meSimp (the default method) runs the prune schedule of :mod:`mesimp_gpu.mesimp` (through the shared
loop of :mod:`mesimp_gpu.train.trainer`): a prune step after each chunk of the pruning cycles, before that
chunk's evaluation. The shrunk
network is checkpointed with its new shape. Whenever dev improves, the model is saved as
``model.json`` + ``model.pt``, so the saved model is the one whose test score is reported.
With ``compare_same_size`` a dense MLP of the final simplified sizes is then trained from scratch
with the same settings (in ``out/same-size``), the paper's comparison.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mesimp_gpu.data.mnist import Mnist, Split, load_mnist
from mesimp_gpu.mesimp import HitRule, MomentReset, PruneOrder
from mesimp_gpu.meprop import MePropConfig
from mesimp_gpu.models.mlp import MLP, BiasGrad, Init, save_mlp
from mesimp_gpu.optim import OptimizerName
from mesimp_gpu.train.records import PHASES, accuracy
from mesimp_gpu.train.settings import METHOD_MODE, Method, check_run_settings, with_preset
from mesimp_gpu.train.trainer import PieceHook, Trainer, chunk_bounds, run_with_baseline

INPUT_SIZE, CLASSES = 784, 10


@dataclass(frozen=True)
class MnistConfig:
    """Every setting of ``mesimp-gpu train mnist``; the CLI options mirror these fields."""

    method: Method = Method.MESIMP  # mesimp | dense | meprop | unified | random
    k: int = 160  # entries kept per example (or per minibatch for unified) per hidden layer; meSimp
    #              reference 160, the meProp paper's MNIST runs 20
    hidden: int = 500  # width of every hidden layer
    layers: int = 2  # number of hidden layers
    hidden_sizes: tuple[int, ...] | None = None  # per-layer widths; overrides hidden and layers
    epochs: int = 2  # passes over the 55,000 training images (the reference runs 20)
    batch_size: int = 100  # examples per update
    optimizer: OptimizerName = OptimizerName.ADAM
    lr: float = 1e-3  # learning rate (the papers: Adam 0.001, AdaGrad 0.1)
    final_lr: float | None = None  # learning rate of the run's last cycle (its last `cycle` epochs); None: lr
    clip: float | None = 5.0  # element-wise gradient clipping; None disables
    lazy: bool = False  # update only the weight rows meProp touched (mesimp_gpu.lazy_optim)
    grad_sum: bool = True  # sum the loss over the minibatch (reference) instead of averaging
    dropout: float = 0.0  # dropout probability after every hidden ReLU (the authors' PyTorch script: 0.1)
    init: Init = Init.NORMAL  # normal: the C# program's; uniform: the authors' PyTorch script's
    bias: BiasGrad = BiasGrad.DENSE  # hidden biases learn from every entry, the kept ones, or not at all
    chunks: int = 8  # dev evaluations per epoch ("IterPerEpoch" of the reference)
    prune: float = 0.1  # meSimp: remove neurons with hits < floor(refer * prune), in [0, 1)
    cycle: int = 1  # meSimp: epochs per cycle, prune in even cycles (reference 5); 0: prune always
    reset_moments: MomentReset = MomentReset.CYCLE  # meSimp: when Adam's m and v (not t) are zeroed
    hits: HitRule = HitRule.KEPT  # meSimp: which kept entries count as hits (reference: the C#'s heap rule)
    order: PruneOrder = PruneOrder.PRUNE_FIRST  # meSimp: prune before a piece's evaluation, or after (the C#)
    compare_same_size: bool = False  # meSimp: then train a dense MLP of the final sizes from scratch
    seed: int = 1  # seeds initialisation, shuffling and random selection
    device: str = "cpu"  # cpu, cuda or cuda:N
    threads: int | None = None  # torch CPU threads; None keeps torch's default
    backend: str = "auto"  # meProp backend, see mesimp_gpu.backends
    data_dir: str | None = None  # MNIST folder; default: MESIMP_DATA_DIR, cache, download
    out: str = "runs/mnist"  # folder for results.json, checkpoint.pt and plots
    limit: int | None = None  # use only the first N training (and N // 10 dev/test) images
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        check_run_settings(self, {"k": self.k, "hidden": self.hidden, "layers": self.layers, "epochs": self.epochs,
                                  "batch_size": self.batch_size, "chunks": self.chunks})
        if self.hidden_sizes is not None and (not self.hidden_sizes or min(self.hidden_sizes) < 1):
            raise ValueError(f"--hidden-sizes must be positive widths, got {list(self.hidden_sizes)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.final_lr is not None and not (0 < self.final_lr < math.inf and self.cycle >= 1):
            raise ValueError(f"--final-lr must be a positive number and needs --cycle >= 1 (it sets the learning "
                             f"rate of the last cycle); got {self.final_lr} with --cycle {self.cycle}")
        if self.compare_same_size and self.method is not Method.MESIMP:
            raise ValueError("--compare-same-size needs --method mesimp (it compares with the simplified sizes)")
        widest = max(self.sizes[1:-1])
        if self.method is not Method.DENSE and self.k > widest:
            raise ValueError(f"--k {self.k} exceeds the hidden width {widest}; use --method dense for full "
                             f"back propagation or choose k <= {widest}")

    @property
    def sizes(self) -> list[int]:
        """Initial layer widths ``[784, hidden x layers, 10]`` (or ``[784, *hidden_sizes, 10]``)."""
        hidden = list(self.hidden_sizes) if self.hidden_sizes is not None else [self.hidden] * self.layers
        return [INPUT_SIZE, *hidden, CLASSES]


class Preset(str, enum.Enum):
    """Named sets of settings for ``train mnist --preset``."""

    PAPER = "paper"  # the meSimp paper's settings (C# code, MNIST), its network at the end is the one measured
    REFERENCE = "reference"  # exactly what the C# program does: its hit rule, moment resets and order
    MEPROP_PYTORCH = "meprop-pytorch"  # the authors' PyTorch meProp script (per-example top-k)


#: preset -> settings; options given explicitly on the command line override them
PRESETS: dict[Preset, dict[str, Any]] = {
    # the C#'s hit rule and its moment resets after every chunk of a cycle's last epoch where a later cycle
    # still prunes (epochs 4 and 9, not 14 and 19: those bursts only cost the final network accuracy),
    # prune before evaluating, and a tenth of the learning rate in the last (fixed-size) cycle: the network
    # at the end is small and settled, and it is the one scored
    Preset.PAPER: dict(
        method=Method.MESIMP, k=160, hidden=500, layers=2, hidden_sizes=None, epochs=20, batch_size=100,
        optimizer=OptimizerName.ADAM, lr=1e-3, clip=5.0, grad_sum=True, chunks=8, prune=0.1, cycle=5,
        reset_moments=MomentReset.BEFORE_PRUNING, hits=HitRule.REFERENCE, order=PruneOrder.PRUNE_FIRST,
        final_lr=1e-4,
    ),
}
PRESETS[Preset.REFERENCE] = {**PRESETS[Preset.PAPER], "reset_moments": MomentReset.LAST_EPOCH,
                             "order": PruneOrder.EVALUATE_FIRST, "final_lr": None}
# src/pytorch of lancopku/meProp: Adam at its defaults, mean loss, no clipping, batch 32, k 30, two hidden
# layers of 512 with dropout 0.1, uniform initialisation, biases that never change (its per-example
# backward returns no bias gradient), one dev evaluation per epoch, 20 epochs
PRESETS[Preset.MEPROP_PYTORCH] = dict(
    method=Method.MEPROP, k=30, hidden=512, layers=2, hidden_sizes=None, epochs=20, batch_size=32,
    optimizer=OptimizerName.ADAM, lr=1e-3, clip=None, grad_sum=False, chunks=1, dropout=0.1, init=Init.UNIFORM,
    bias=BiasGrad.FROZEN, final_lr=None,
)


def mnist_config(preset: Preset | None = None, **settings: Any) -> MnistConfig:
    """An :class:`MnistConfig` from ``preset`` (if any) with ``settings`` on top; unknown names are errors."""
    return with_preset(MnistConfig, PRESETS[preset] if preset else {}, settings, "MNIST")


#: settings that may differ between a run and its resumption (a run folder may be moved, too)
RESUMABLE_CHANGES = {"epochs", "progress", "device", "backend", "threads", "data_dir", "out", "compare_same_size"}


def subset(data: Mnist, limit: int | None) -> Mnist:
    """The first ``limit`` training and ``limit // 10`` (at least 100) dev and test examples."""
    if limit is None:
        return data
    small = max(limit // 10, 100)
    return Mnist(data.train.head(limit), data.dev.head(small), data.test.head(small))


class MnistTrainer(Trainer):
    """One MNIST run: data on the device, the MLP, and the shared loop (meSimp schedule, hooks, records)."""

    resumable_changes = RESUMABLE_CHANGES
    title = "MNIST"

    def __init__(self, config: MnistConfig, data: Mnist | None = None, hooks: tuple[PieceHook, ...] = ()) -> None:
        super().__init__(config, hooks)
        data = subset(data or load_mnist(config.data_dir), config.limit)
        self.train_set, self.dev, self.test = (
            Split(s.images.to(self.device), s.labels.to(self.device)) for s in (data.train, data.dev, data.test)
        )
        self.loss_fn = nn.CrossEntropyLoss(reduction="sum" if config.grad_sum else "mean")
        self.start()

    def build_model(self, hidden_sizes: list[int] | None) -> MLP:
        """The MLP with this run's meProp settings, on the run's device."""
        c = self.config
        sizes = c.sizes if hidden_sizes is None else [INPUT_SIZE, *hidden_sizes, CLASSES]
        meprop = MePropConfig(METHOD_MODE[c.method], c.k, c.backend, nonzero_hits=c.hits is HitRule.NONZERO)
        return MLP(sizes, meprop, track_hits=c.method is Method.MESIMP, reference_hits=c.hits is HitRule.REFERENCE,
                   dropout=c.dropout, init=c.init, bias_grad=c.bias).to(self.device)

    @property
    def sizes(self) -> list[int]:
        return self.model.sizes

    def architecture_state(self) -> dict[str, Any]:
        return {**super().architecture_state(), "refer": [layer.refer for layer in self.model.hidden]}

    def restore_records(self, state: dict[str, Any]) -> None:
        for layer, refer in zip(self.model.hidden, state["refer"]):
            layer.refer = refer

    def train_piece(self, order: torch.Tensor, bar: tqdm | None) -> float:
        """Update steps over the training examples ``order`` (indices); returns the mean loss per example
        (of several processes: this process's share of it)."""
        c, total = self.config, 0.0
        for start in range(0, len(order), c.batch_size):
            batch = self.dist.shard(order[start : start + c.batch_size], mean_loss=not c.grad_sum)
            x, y = self.train_set.images[batch], self.train_set.labels[batch]
            value = self.update_step(lambda: self.loss_fn(self.net(x), y))  # noqa: B023 - called at once
            total += value if c.grad_sum else value * len(batch)
            self.step_postfix(bar, value / len(batch) if c.grad_sum else value)
        return total / max(len(order), 1)

    def evaluate(self, epoch: int, chunk: int, loss: float, extra: dict[str, Any]) -> dict[str, Any]:
        """Score dev (and test when dev improved); append and return the history record."""
        return self.record(epoch, chunk, loss, accuracy(self.model, self.dev.images, self.dev.labels),
                           self.score_test, extra)

    def score_test(self) -> float:
        """Test accuracy of the model as it is now."""
        return accuracy(self.model, self.test.images, self.test.labels)

    def save_model(self, directory: Path) -> None:
        save_mlp(self.model, directory)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The shuffled example order of ``epoch``; depends only on the seed and the epoch (so resumes match)."""
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        return torch.randperm(len(self.train_set), generator=generator).to(self.device)

    def learning_rate(self, epoch: int) -> float:
        """The learning rate of ``epoch``: ``final_lr`` in the run's last cycle (when set), else ``lr``."""
        c = self.config
        return c.final_lr if c.final_lr is not None and epoch >= c.epochs - c.cycle else c.lr

    def epoch_pieces(self, epoch: int) -> list[torch.Tensor]:
        """The shuffled example indices of ``epoch``, cut into ``chunks`` pieces; also sets the epoch's
        learning rate (a function of the epoch alone, so a resumed run sets the same)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(epoch)
        order = self.epoch_order(epoch)
        return [order[a:b] for a, b in chunk_bounds(len(order), self.config.chunks)]

    def piece_steps(self, piece: torch.Tensor) -> int:
        return -(-len(piece) // self.config.batch_size)

    def results(self, final: bool = False) -> dict[str, Any]:
        """The results document: the shared core plus kept sizes (final and at the best dev score) and times."""
        results = self.results_core("mnist", final)
        kept = self.model.sizes[1:-1]
        # meSimp keeps shrinking after the best dev score: report the size of the scored network too
        at_best = next((r["sizes"][1:-1] for r in self.history if r["step"] == self.best.best_step), kept)
        results["final"].update({
            "kept": kept,
            "kept_mean": sum(kept) / len(kept),
            "kept_at_best_dev": at_best,
            "kept_mean_at_best_dev": sum(at_best) / len(at_best),
            "train_seconds": sum(t[p] for t in self.epoch_times for p in PHASES),
            "prune_seconds": sum(r.get("prune_seconds", 0.0) for r in self.history),
        })
        return results


def same_size_config(config: MnistConfig, kept: list[int]) -> MnistConfig:
    """The baseline of ``config``'s meSimp run: a dense MLP with hidden widths ``kept``, trained from
    scratch with the same budget (epochs, batch, optimizer, seed), written to ``out/same-size``."""
    return replace(config, method=Method.DENSE, hidden_sizes=tuple(kept), compare_same_size=False,
                   out=str(Path(config.out) / "same-size"))


def train_mnist(config: MnistConfig, resume: bool = False, data: Mnist | None = None,
                hooks: tuple[PieceHook, ...] = ()) -> dict[str, Any]:
    """Train as ``config`` says (continuing ``config.out``'s checkpoint when ``resume``); returns the results.

    With ``compare_same_size`` the results gain ``same_size``: the final metrics of the dense
    same-size baseline (resumed too when its checkpoint exists), and the plots show both runs.
    """
    baseline = None
    if config.compare_same_size:
        baseline = lambda kept: MnistTrainer(same_size_config(config, kept), data)  # noqa: E731
    return run_with_baseline(MnistTrainer(config, data, hooks), resume, baseline, config.sizes[1:-1])


def summary_table(results: dict[str, Any]) -> str:
    """A plain-text table of a run (and its same-size baseline, when present): test accuracy at the best dev
    score and the size of that network, the size and test accuracy of the network at the end, parameters
    before and after, training time."""
    rows = [("run", "test acc", "best dev", "kept at best", "mean", "kept at end", "mean", "test at end",
             "params before", "params after", "train s", "s/epoch")]
    runs = [(results["config"]["method"], results["final"])]
    if "same_size" in results:
        runs.append(("dense same size", results["same_size"]))
    for name, final in runs:
        epoch = sum(final["mean_epoch_seconds"].values())
        rows.append((name, f"{final['test_acc_at_best_dev']:.2f}", f"{final['best_dev_acc']:.2f}",
                     "-".join(map(str, final["kept_at_best_dev"])), f"{final['kept_mean_at_best_dev']:.1f}",
                     "-".join(map(str, final["kept"])), f"{final['kept_mean']:.1f}",
                     f"{final['test_acc_final_network']:.2f}", f"{final['parameters_initial']:,}",
                     f"{final['parameters_final']:,}",
                     f"{final['train_seconds']:.1f}", f"{epoch:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)

"""The training loop every task trainer shares: pieces of epochs, timed update steps, the meSimp schedule,
best-dev tracking, checkpoints that resume exactly, and the results document's common part."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from mesimp_gpu.backends import InvalidGradientError, get_backend
from mesimp_gpu.io import write_json
from mesimp_gpu.machine import describe
from mesimp_gpu.mesimp import PruneOrder
from mesimp_gpu.optim import build_optimizer, clip_elementwise
from mesimp_gpu.plots import plot_history, plot_simplification
from mesimp_gpu.train.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mesimp_gpu.train.distributed import DataParallel
from mesimp_gpu.train.records import PHASES, BestTracker, PhaseTimer, jsonable
from mesimp_gpu.train.run_folder import FINAL_MODEL_FOLDER
from mesimp_gpu.train.settings import Method, mesimp_schedule, resolve_device, seed_everything


def diverged(step: int, what: str) -> str:
    """The one message for a run whose numbers stopped being finite, whichever method noticed it."""
    return f"training diverged at update step {step}: the {what} is not finite; lower --lr or set --clip"


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into ``chunks`` contiguous, nearly equal ``(start, stop)`` pieces (empty ones dropped)."""
    edges = [round(i * n / chunks) for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A per-epoch progress bar; it stays silent when disabled or when stderr is not a terminal
    (a log file gets the per-epoch lines, not thousands of bar redraws)."""
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True)


class PieceHook(Protocol):
    """Something that acts between pieces of training, after the meSimp schedule (tests probe state with it)."""

    def on_chunk_end(self, trainer: Trainer, epoch: int, chunk: int) -> dict[str, Any]:
        """Called after each piece's update steps, before evaluation; returns fields for the history record."""


class Trainer:
    """Bookkeeping every task trainer shares: device and threads, seeded model and optimizer,
    timed update steps, best-dev tracking, checkpoints that resume exactly, and the results core.

    A subclass loads its data, then calls :meth:`start`; it implements :meth:`build_model`
    (``hidden_sizes`` None: the configured sizes) and :attr:`sizes`, and may extend
    :meth:`architecture_state` / :meth:`restore_records` for state outside the ``state_dict``.
    Its config needs ``method``, ``device``, ``threads``, ``backend``, ``out``, ``seed``, ``optimizer``, ``lr``,
    ``clip``, ``lazy`` and the meSimp fields ``prune``, ``cycle``, ``reset_moments``; its model, under meSimp,
    offers ``mesimp_prune_`` (:class:`~mesimp_gpu.mesimp.Prunable`).
    """

    #: config fields that may differ between a run and its resumption
    resumable_changes: frozenset[str] = frozenset()

    def __init__(self, config: Any, hooks: tuple[PieceHook, ...] = ()) -> None:
        self.config = config
        # one process of several under torchrun or --nproc: its share of the run, and its device
        self.dist, self.device = DataParallel.from_environment(resolve_device(config.device))
        self.dist.check_lazy(config.lazy)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        get_backend(config.backend, self.device)  # fail now, not in the first backward pass
        self.out = Path(config.out)
        self.schedule = mesimp_schedule(config) if config.method is Method.MESIMP else None
        self.hooks = hooks
        self.machine = describe(self.device)  # once per run: every save writes it

    def start(self) -> None:
        """Seed, build the model and optimizer, and reset the run's records."""
        seed_everything(self.config.seed)
        self.model = self.build_model(None)
        self.optimizer = self.new_optimizer()
        self.net = self.dist.wrap(self.model)  # forward passes of training go through it (DDP under several processes)
        self.dist.seed_process(self.config.seed)
        self.timer = PhaseTimer(self.device)
        self.best = BestTracker()
        self.history: list[dict[str, Any]] = []
        self.epoch_times: list[dict[str, float]] = []
        self.position = (0, 0)  # (epoch, chunk) of the next piece to train
        self.step = 0
        self.initial_params = self.parameter_count()
        self._test_scorer: Callable[[], float] | None = None  # the scorer the task last gave record()

    def new_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over the current model (lazy or dense, see :func:`build_optimizer`)."""
        c = self.config
        return build_optimizer(c.optimizer, self.model.parameters(), c.lr, lazy=c.lazy, clip=c.clip, backend=c.backend)

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
            try:
                self.dist.backward(loss)
            except InvalidGradientError:  # meProp met it first: the same message as for the loss
                raise ValueError(diverged(self.step + 1, f"training loss ({float(loss.detach())}) or its "
                                          "gradient")) from None
        with self.timer.phase("update"):
            if not self.config.lazy:  # a lazy optimizer clips the rows it updates itself
                clip_elementwise(self.model.parameters(), self.config.clip)
            self.optimizer.step()
        self.step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ValueError(diverged(self.step, f"training loss ({value})"))
        return value

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
        self._test_scorer = score_test  # scores the model as it then is (the final network at the end)
        test = None
        if self.best.improved(dev):
            test = score_test()
            self.best.update(dev, test, self.step)
            if self.dist.main:
                self.on_best()
        entry = {"epoch": epoch, "chunk": chunk, "step": self.step, "train_loss": loss, "dev_acc": dev,
                 "test_acc": test, "sizes": self.sizes, **extra}
        self.history.append(entry)
        return entry

    def on_best(self) -> None:
        """Called when the dev score improved (after test was scored): the reported model is saved."""
        self.save_model(self.out)

    def save_model(self, directory: Path) -> None:
        """Save the current model (architecture JSON beside the weights) into ``directory``."""
        raise NotImplementedError

    def score_test(self) -> float | None:
        """The test score of the model as it is now, by the scorer the task last gave :meth:`record` (None
        before the first evaluation); a task may override it."""
        return self._test_scorer() if self._test_scorer is not None else None

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
            "machine": self.machine,
            "finished": final,
            "history": self.history,
            "epoch_seconds": self.epoch_times,
            "final": {
                "best_dev_acc": self.best.best_dev,
                "test_acc_at_best_dev": self.best.test_at_best,
                "best_step": self.best.best_step,
                "last_dev_acc": self.history[-1]["dev_acc"] if self.history else None,
                # meSimp scores an earlier, larger network at the best dev than the one it ends with
                "sizes_at_best_dev": next((r["sizes"] for r in self.history if r["step"] == self.best.best_step),
                                          None),
                "test_acc_final_network": self.score_test() if final else None,
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
        """Between a piece's updates and its evaluation: the meSimp schedule, then the hooks; returns history fields."""
        extra: dict[str, Any] = {}
        if self.schedule is not None:
            before = self.sizes[1:-1]
            self.dist.sum_records(self.model)  # every process prunes by the run's record
            extra = self.schedule.after_piece(self.model, self.optimizer, epoch, last)
            if not extra["pruned"]:
                self.dist.keep_records_on_main(self.model)
            elif self.dist.world > 1:
                self.net = self.dist.wrap(self.model)  # DDP holds the old parameters: wrap the new shapes
            if extra["pruned"] and self.dist.main:
                after = self.sizes[1:-1]
                tqdm.write(f"epoch {epoch + 1} chunk {chunk + 1}: hidden sizes {'-'.join(map(str, after))} "
                           f"(removed {sum(before) - sum(after)}, {self.parameter_count():,} parameters)")
        for hook in self.hooks:
            extra.update(hook.on_chunk_end(self, epoch, chunk))
        return extra

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
            bar = progress_bar(sum(map(self.piece_steps, pieces)), f"epoch {epoch + 1}/{c.epochs}",
                               c.progress and self.dist.main)
            bar.update(sum(map(self.piece_steps, pieces[:first])))
            for chunk in range(first, len(pieces)):
                loss = self.dist.sum_float(self.train_piece(pieces[chunk], bar))  # each process: its share
                last = chunk == len(pieces) - 1
                if self.schedule is not None and self.schedule.order is PruneOrder.EVALUATE_FIRST:
                    self.evaluate(epoch, chunk, loss, {}).update(self.after_piece(epoch, chunk, last))
                else:
                    self.evaluate(epoch, chunk, loss, self.after_piece(epoch, chunk, last))
                self.end_piece(epoch, chunk, len(pieces))
            bar.close()
            if self.dist.main:
                tqdm.write(self.epoch_line(epoch))
        results = self.results(final=True)
        if self.dist.main:  # one process writes the run's files
            self.save_model(self.out / FINAL_MODEL_FOLDER)  # the network at the end (meSimp: the smallest)
            write_json(self.out / "results.json", results)
            plot_history(self.history, self.out / "curves.png", title=f"{self.title}, {c.method.value}")
        return results

    def architecture_state(self) -> dict[str, Any]:
        """Checkpoint entries that describe the model's shape and records outside its ``state_dict``."""
        return {"hidden_sizes": self.sizes[1:-1]}

    def restore_records(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`architecture_state` saved beyond the sizes (meSimp ``refer`` counters)."""

    def save(self) -> None:
        """Checkpoint and partial results, both written atomically (by process 0 of several)."""
        rngs = self.dist.gather_object(rng_state())  # every process's generators: a resumed run continues each
        if not self.dist.main:
            return
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
            "rng": rngs[0],
            "rng_processes": rngs,
            "processes": self.dist.world,
            "initial_params": self.initial_params,
        })
        write_json(self.out / "results.json", self.results())

    def restore(self) -> None:
        """Continue from ``checkpoint.pt`` in ``out``; refuses a checkpoint made with different settings."""
        state = self.dist.from_main(lambda: load_checkpoint(self.checkpoint_path))  # no shared disk needed
        self.dist.check_world(state.get("processes", 1))
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
        self.net = self.dist.wrap(self.model)
        self.position, self.step = tuple(state["position"]), state["step"]
        self.history, self.epoch_times = state["history"], state["epoch_times"]
        self.timer.seconds = state["timer"]
        self.best = BestTracker(**state["best"])
        self.initial_params = state["initial_params"]
        set_rng_state(state["rng_processes"][self.dist.procs.rank] if "rng_processes" in state else state["rng"])
        epoch, chunk = self.position
        where = "its last epoch is done" if epoch >= self.config.epochs else f"epoch {epoch + 1}, piece {chunk + 1}"
        if self.dist.main:
            tqdm.write(f"resuming {self.checkpoint_path} after {self.step} update steps: {where}")


def run_with_baseline(
    trainer: Trainer, resume: bool, baseline: Callable[[list[int]], Trainer] | None, initial: list[int]
) -> dict[str, Any]:
    """Run ``trainer`` (from its checkpoint when ``resume``); returns its results.

    ``baseline`` (meSimp's ``--compare-same-size``) makes the dense trainer of the final hidden sizes; it
    runs next (resumed too when its checkpoint exists) and its final metrics join the results as
    ``same_size``. A meSimp run also draws its hidden sizes (from ``initial``) and dev accuracy, the
    baseline's beside it.
    """
    with trainer.dist.failures():  # a peer's failure: one line here, not a hang or a traceback
        return _run_with_baseline(trainer, resume, baseline, initial)


def _run_with_baseline(
    trainer: Trainer, resume: bool, baseline: Callable[[list[int]], Trainer] | None, initial: list[int]
) -> dict[str, Any]:
    if resume:
        trainer.restore()
    results = trainer.run()
    runs = {trainer.config.method.value: trainer.history}
    if baseline is not None:
        base = baseline(trainer.sizes[1:-1])
        if resume and trainer.dist.from_main(base.checkpoint_path.is_file):
            base.restore()
        results["same_size"] = {"out": str(base.out), **base.run()["final"]}
        runs["dense, same size from scratch"] = base.history
        if trainer.dist.main:
            write_json(trainer.out / "results.json", results)
    if trainer.config.method is Method.MESIMP and trainer.dist.main:
        plot_simplification(runs, trainer.out / "hidden_sizes.png", trainer.out / "dev_accuracy.png",
                            f"{trainer.title}, meSimp", initial=initial)
    return results

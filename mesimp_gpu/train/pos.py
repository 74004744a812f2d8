"""Train the POS tagger (meProp LSTM) on a CoNLL-U treebank: dense, meProp variants or meSimp.

Data: ``--train/--dev/--test`` files, or a ``--data-dir`` holding one ``*train.conllu[.gz]``, one
``*dev.conllu[.gz]`` and one ``*test.conllu[.gz]`` (the UD file names). Vocabularies come from train.

Schedule (as the MNIST trainer): each epoch is shuffled and cut into ``chunks`` pieces; within a piece
sentences of similar length are batched together (less padding) and the batches run in random order.
After each piece the dev set is scored, and the test set when dev improved; the reported test accuracy
is the one at the best dev accuracy. Checkpoint and results are rewritten after every piece, so
``resume`` continues from the last finished piece.

meSimp schedule: the MLP's (:mod:`mesimp_gpu.mesimp`: :func:`~mesimp_gpu.mesimp.prunes_in`,
:func:`~mesimp_gpu.mesimp.ends_cycle`). Cycles of ``cycle`` epochs; in even cycles a prune step
(:meth:`~mesimp_gpu.lstm.MePropLSTM.mesimp_prune_`) follows every piece, before its evaluation; in odd
cycles the kept units stay fixed while the hit record keeps counting. Adam's moments are reset after
the last piece of every cycle. ``cycle = 0`` prunes after every piece of every epoch. With the default
``cycle = 5`` a short run (up to 5 epochs) prunes after every piece.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from tqdm import tqdm

from mesimp_gpu.backends import get_backend
from mesimp_gpu.data.conllu import (
    IGNORE_TAG,
    Batch,
    EncodedSentence,
    Sentence,
    TaggingVocab,
    TagSet,
    make_batch,
    read_conllu,
    word_counts,
    word_dropout,
)
from mesimp_gpu.io import write_json
from mesimp_gpu.lstm import GateSelection, HitCounting
from mesimp_gpu.meprop import MePropConfig, MePropMode
from mesimp_gpu.mesimp import check_threshold, ends_cycle, prunes_in
from mesimp_gpu.models.tagger import Tagger
from mesimp_gpu.optim import OptimizerName, build_optimizer, clip_elementwise, reset_moments
from mesimp_gpu.plots import plot_history
from mesimp_gpu.train.common import (
    BestTracker,
    PhaseTimer,
    chunk_bounds,
    jsonable,
    load_checkpoint,
    machine_info,
    resolve_device,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

SPLITS = ("train", "dev", "test")
EVAL_BATCH = 256  # sentences per evaluation batch (no gradients, so memory is small)


class Method(str, enum.Enum):
    """Training method of ``train pos``."""

    DENSE = "dense"  # full back propagation
    MEPROP = "meprop"  # per-example top-k of the LSTM gate gradient (the paper's method)
    UNIFIED = "unified"  # one top-k set per step for the minibatch
    RANDOM = "random"  # k random gate entries per example (ablation)
    MESIMP = "mesimp"  # meProp plus pruning of rarely selected hidden units


METHOD_MODE = {
    Method.DENSE: MePropMode.DENSE,
    Method.MEPROP: MePropMode.TOPK,
    Method.UNIFIED: MePropMode.UNIFIED,
    Method.RANDOM: MePropMode.RANDOM,
    Method.MESIMP: MePropMode.TOPK,
}


@dataclass(frozen=True)
class PosConfig:
    """Every setting of ``mesimp-gpu train pos``; the CLI options mirror these fields."""

    method: Method = Method.MEPROP  # dense | meprop | unified | random | mesimp
    k: int = 5  # gate-gradient entries kept per example and step (per gate with selection per-gate)
    selection: GateSelection = GateSelection.PER_GATE  # top-k over all 4H gate entries, or k per gate
    counting: HitCounting = HitCounting.ANY  # meSimp: a unit hit once per token (any) or per selected gate
    hidden: int = 500  # LSTM hidden size (per direction)
    bidirectional: bool = False  # the paper's tagger reads left to right
    epochs: int = 2  # passes over the training sentences
    batch_size: int = 16  # sentences per update (the paper: 1)
    optimizer: OptimizerName = OptimizerName.ADAM
    lr: float = 1e-3  # learning rate (the papers: Adam 0.001, AdaGrad 0.01 for POS)
    clip: Optional[float] = 5.0  # element-wise gradient clipping; None disables
    word_dim: int = 50  # word embedding size
    feature_dim: int = 20  # embedding size of each of the 7 shape features
    word_dropout: float = 0.25  # alpha: a word of train count c becomes UNK with probability alpha / (alpha + c)
    tagset: TagSet = TagSet.XPOS  # xpos (Penn Treebank in EWT) or upos
    chunks: int = 4  # dev evaluations per epoch
    prune_threshold: float = 0.1  # meSimp: drop units with hits < floor(refer * threshold)
    cycle: int = 5  # meSimp: epochs per cycle; prune in even cycles, fixed in odd ones; 0: always prune
    seed: int = 1  # seeds initialisation, shuffling, word dropout and random selection
    device: str = "cpu"  # cpu, cuda or cuda:N
    backend: str = "auto"  # meProp backend, see mesimp_gpu.backends
    threads: Optional[int] = None  # torch CPU threads; None keeps torch's default
    data_dir: Optional[str] = None  # folder with *train/*dev/*test.conllu[.gz]
    train_file: Optional[str] = None  # explicit files override data_dir
    dev_file: Optional[str] = None
    test_file: Optional[str] = None
    out: str = "runs/pos"  # folder for results.json, checkpoint.pt and plots
    limit: Optional[int] = None  # use only the first N training (and N // 10, at least 100, dev/test) sentences
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        positive = {"k": self.k, "hidden": self.hidden, "epochs": self.epochs, "batch_size": self.batch_size,
                    "word_dim": self.word_dim, "feature_dim": self.feature_dim, "chunks": self.chunks}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.cycle < 0:
            raise ValueError(f"--cycle must be at least 0, got {self.cycle}")
        for name, value in (("limit", self.limit), ("threads", self.threads)):
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"--clip must be positive, got {self.clip}")
        if self.word_dropout < 0:
            raise ValueError(f"--word-dropout must be >= 0, got {self.word_dropout}")
        check_threshold(self.prune_threshold)
        if self.data_dir is None and None in (self.train_file, self.dev_file, self.test_file):
            raise ValueError("no data: pass --data-dir (a folder with *train/*dev/*test.conllu[.gz]) "
                             "or all of --train-file, --dev-file and --test-file")


#: settings that may differ between a run and its resumption
RESUMABLE_CHANGES = {"epochs", "progress", "device", "backend", "threads", "data_dir", "train_file",
                     "dev_file", "test_file"}


def find_treebank(config: PosConfig) -> dict[str, Path]:
    """The train/dev/test file paths: explicit files first, else the one match per split in ``data_dir``."""
    explicit = {"train": config.train_file, "dev": config.dev_file, "test": config.test_file}
    paths: dict[str, Path] = {}
    for split in SPLITS:
        if explicit[split] is not None:
            paths[split] = Path(explicit[split])
            continue
        folder = Path(config.data_dir)  # type: ignore[arg-type]  # __post_init__ guarantees one source
        if not folder.is_dir():
            raise FileNotFoundError(f"--data-dir {folder} is not a folder")
        pattern = re.compile(rf".*{split}\.conllu(\.gz)?")
        matches = sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))
        if len(matches) != 1:
            found = ", ".join(p.name for p in matches) or "none"
            raise FileNotFoundError(f"--data-dir {folder}: need exactly one *{split}.conllu[.gz], found {found}; "
                                    f"pass --{split}-file instead")
        paths[split] = matches[0]
    return paths


def load_splits(config: PosConfig) -> tuple[dict[str, list[Sentence]], dict[str, Path]]:
    """Sentences per split (``limit`` applied: N train, max(N // 10, 100) dev and test) and their paths."""
    paths = find_treebank(config)
    small = None if config.limit is None else max(config.limit // 10, 100)
    limits = {"train": config.limit, "dev": small, "test": small}
    return {split: read_conllu(paths[split], limits[split]) for split in SPLITS}, paths


def length_batches(
    indices: list[int], lengths: list[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """Group ``indices`` into batches of similar sentence length, returned in random order."""
    by_length = sorted(indices, key=lambda i: lengths[i])
    batches = [by_length[a : a + batch_size] for a in range(0, len(by_length), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


class PosTrainer:
    """One tagging run: data, vocabularies, model, optimizer, history and checkpoints."""

    def __init__(self, config: PosConfig, splits: dict[str, list[Sentence]] | None = None) -> None:
        self.config = c = config
        self.device = resolve_device(c.device)
        if c.threads is not None:
            torch.set_num_threads(c.threads)
        get_backend(c.backend, self.device)  # fail now, not in the first backward pass
        self.out = Path(c.out)
        if splits is None:
            splits, paths = load_splits(c)
            self.sources = {s: str(p) for s, p in paths.items()}
        else:
            self.sources = {s: "<given>" for s in SPLITS}
        self.vocab = TaggingVocab.build(splits["train"], c.tagset)
        self.data: dict[str, list[EncodedSentence]] = {s: [self.vocab.encode(x) for x in splits[s]] for s in SPLITS}
        self.counts = word_counts(self.vocab.words).to(self.device)
        seed_everything(c.seed)
        self.model = self.build_model()
        self.optimizer = build_optimizer(c.optimizer, self.model.parameters(), c.lr)
        self.timer = PhaseTimer(self.device)
        self.best = BestTracker()
        self.history: list[dict[str, Any]] = []
        self.epoch_times: list[dict[str, float]] = []
        self.position = (0, 0)  # (epoch, chunk) of the next piece to train
        self.step = 0
        self.initial_params = self.parameter_count()

    def build_model(self, hidden_sizes: list[int] | None = None) -> Tagger:
        """The tagger with this run's settings; ``hidden_sizes`` (per direction) for a pruned checkpoint."""
        c = self.config
        model = Tagger(
            len(self.vocab.words), [len(v) for v in self.vocab.features.values()], len(self.vocab.tags),
            MePropConfig(METHOD_MODE[c.method], c.k, c.backend), hidden=c.hidden, word_dim=c.word_dim,
            feature_dim=c.feature_dim, bidirectional=c.bidirectional, selection=c.selection, counting=c.counting,
            track_hits=c.method is Method.MESIMP,
        )
        if hidden_sizes is not None:
            # shrink to the saved sizes; which units are kept does not matter, load_state_dict overwrites them
            keeps = [torch.arange(c.hidden) < n for n in hidden_sizes]
            model.lstm.prune_units_(keeps, model.output)
        return model.to(self.device)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def sizes(self) -> list[int]:
        """``[input, hidden per direction..., tags]``: the layer widths, as the MLP reports them."""
        lstm = self.model.lstm
        return [lstm.input_size, *[d.hidden_size for d in lstm.directions], len(self.vocab.tags)]

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def mesimp_step(self, epoch: int, last_chunk: bool) -> dict[str, Any]:
        """After a piece (meSimp only): prune in pruning epochs, reset Adam's moments at a cycle's end."""
        c = self.config
        if c.method is not Method.MESIMP:
            return {}
        record = {"pruned": prunes_in(epoch, c.cycle), "moments_reset": last_chunk and ends_cycle(epoch, c.cycle)}
        if record["pruned"]:
            self.model.mesimp_prune_(c.prune_threshold, self.optimizer)
        if record["moments_reset"]:
            reset_moments(self.optimizer)
        return record

    def epoch_batches(self, epoch: int) -> list[list[list[int]]]:
        """Per piece, the batches (sentence indices) of ``epoch``; depends only on the seed and the epoch."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed * 100_003 + epoch)
        order = torch.randperm(len(self.data["train"]), generator=generator).tolist()
        lengths = [len(s.words) for s in self.data["train"]]
        pieces = chunk_bounds(len(order), c.chunks)
        return [length_batches(order[a:b], lengths, c.batch_size, generator) for a, b in pieces]

    def train_piece(self, batches: list[list[int]], bar: tqdm | None) -> float:
        """Update steps over ``batches``; returns the mean loss per token."""
        c, total, tokens = self.config, 0.0, 0
        self.model.train()
        for indices in batches:
            batch = make_batch([self.data["train"][i] for i in indices]).to(self.device)
            with self.timer.phase("forward"):
                words = word_dropout(batch.words, self.counts, c.word_dropout)
                loss = self.model.loss(self.model(Batch(words, batch.features, batch.tags, batch.lengths)), batch.tags)
            with self.timer.phase("backward"):
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with self.timer.phase("update"):
                clip_elementwise(self.model.parameters(), c.clip)
                self.optimizer.step()
            n, value = int(batch.lengths.sum()), loss.detach().item()
            total, tokens = total + value, tokens + n
            self.step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value / n:.4f}", dev=f"{self.best.best_dev:.2f}")
        return total / max(tokens, 1)

    @torch.no_grad()
    def accuracy(self, split: str) -> float:
        """Token accuracy (%) on ``split``."""
        sentences = sorted(self.data[split], key=lambda s: len(s.words))
        self.model.eval()
        correct = total = 0
        for a in range(0, len(sentences), EVAL_BATCH):
            batch = make_batch(sentences[a : a + EVAL_BATCH]).to(self.device)
            predicted = self.model(batch).argmax(dim=2)
            real = batch.tags != IGNORE_TAG
            correct += int((predicted == batch.tags)[real].sum())
            total += int(real.sum())
        self.model.train()
        return 100.0 * correct / max(total, 1)

    def evaluate(self, epoch: int, chunk: int, loss: float, extra: dict[str, Any]) -> dict[str, Any]:
        """Score dev (and test when dev improved); append and return the history record."""
        dev = self.accuracy("dev")
        test = None
        if self.best.improved(dev):
            test = self.accuracy("test")
            self.best.update(dev, test, self.step)
        record = {"epoch": epoch, "chunk": chunk, "step": self.step, "train_loss": loss, "dev_acc": dev,
                  "test_acc": test, "sizes": self.sizes, **extra}
        self.history.append(record)
        return record

    def run(self) -> dict[str, Any]:
        """Train from ``self.position`` to the last epoch; returns (and writes) the results."""
        c = self.config
        start_epoch, start_chunk = self.position
        for epoch in range(start_epoch, c.epochs):
            pieces = self.epoch_batches(epoch)
            first = start_chunk if epoch == start_epoch else 0
            bar = tqdm(total=sum(map(len, pieces)), desc=f"epoch {epoch + 1}/{c.epochs}", disable=not c.progress,
                       leave=False, dynamic_ncols=True)
            bar.update(sum(map(len, pieces[:first])))
            for chunk in range(first, len(pieces)):
                loss = self.train_piece(pieces[chunk], bar)
                extra = self.mesimp_step(epoch, last_chunk=chunk == len(pieces) - 1)
                record = self.evaluate(epoch, chunk, loss, extra)
                if chunk == len(pieces) - 1:
                    self.epoch_times.append({"epoch": epoch, **self.timer.take()})
                self.position = (epoch, chunk + 1) if chunk + 1 < len(pieces) else (epoch + 1, 0)
                self.save()
                bar.set_postfix(loss=f"{loss:.4f}", dev=f"{record['dev_acc']:.2f}")
            bar.close()
            last = self.history[-1]
            tqdm.write(f"epoch {epoch + 1}/{c.epochs}: loss {last['train_loss']:.4f}  dev {last['dev_acc']:.2f}  "
                       f"best dev {self.best.best_dev:.2f} (test {self.best.test_at_best:.2f})  "
                       f"hidden {self.sizes[1:-1]}")
        results = self.results(final=True)
        write_json(self.out / "results.json", results)
        plot_history(self.history, self.out / "curves.png", title=f"POS tagging, {c.method.value}")
        return results

    def results(self, final: bool = False) -> dict[str, Any]:
        """The results document: config, data, machine, history, time per epoch, final metrics."""
        phases = ("forward", "backward", "update")
        per_epoch = {p: sum(t[p] for t in self.epoch_times) / max(len(self.epoch_times), 1) for p in phases}
        return {
            "task": "pos",
            "config": jsonable(self.config),
            "data": {s: {"source": self.sources[s], "sentences": len(self.data[s]),
                         "tokens": sum(len(x.words) for x in self.data[s])} for s in SPLITS}
            | {"words": len(self.vocab.words), "tags": len(self.vocab.tags)},
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

    def save(self) -> None:
        """Checkpoint and partial results, both written atomically."""
        save_checkpoint(self.checkpoint_path, {
            "config": jsonable(self.config),
            "hidden_sizes": self.sizes[1:-1],
            "refer": [d.refer for d in self.model.lstm.directions],
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
        changed = sorted(k for k in mine if k not in RESUMABLE_CHANGES and state["config"].get(k) != mine[k])
        if changed:
            raise ValueError(f"checkpoint {self.checkpoint_path} was made with different settings "
                             f"({', '.join(changed)}); use the same options, or another --out")
        self.model = self.build_model(state["hidden_sizes"])
        self.model.load_state_dict(state["model"])
        for d, refer in zip(self.model.lstm.directions, state["refer"]):
            d.refer = refer
        self.optimizer = build_optimizer(self.config.optimizer, self.model.parameters(), self.config.lr)
        self.optimizer.load_state_dict(state["optimizer"])
        self.position, self.step = tuple(state["position"]), state["step"]
        self.history, self.epoch_times = state["history"], state["epoch_times"]
        self.timer.seconds = state["timer"]
        self.best = BestTracker(**state["best"])
        self.initial_params = state["initial_params"]
        set_rng_state(state["rng"])


def train_pos(
    config: PosConfig, resume: bool = False, splits: dict[str, list[Sentence]] | None = None
) -> dict[str, Any]:
    """Train as ``config`` says (continuing ``config.out``'s checkpoint when ``resume``); returns the results."""
    trainer = PosTrainer(config, splits)
    if resume:
        trainer.restore()
    return trainer.run()


_D = {name: f.default for name, f in PosConfig.__dataclass_fields__.items()}  # CLI defaults = config defaults


def pos_command(
    method: Method = typer.Option(_D["method"], help="dense: full back propagation; meprop: per-example top-k of the "
                                  "LSTM gate gradient (the paper); unified: one top-k set per step and minibatch; "
                                  "random: k random entries; mesimp: meprop plus pruning of rarely selected units."),
    k: int = typer.Option(_D["k"], help="Gate-gradient entries kept per example and step "
                          "(per gate with --selection per-gate)."),
    selection: GateSelection = typer.Option(_D["selection"], help="Top-k over all 4H gate entries, or k in each gate."),
    counting: HitCounting = typer.Option(_D["counting"], help="meSimp hits: once per token when any gate is kept, "
                                         "or per kept gate."),
    hidden: int = typer.Option(_D["hidden"], help="LSTM hidden size (per direction)."),
    bidirectional: bool = typer.Option(_D["bidirectional"], help="Add a right-to-left LSTM."),
    epochs: int = typer.Option(_D["epochs"], help="Passes over the training sentences."),
    batch_size: int = typer.Option(_D["batch_size"], help="Sentences per update step (the paper: 1)."),
    optimizer: OptimizerName = typer.Option(_D["optimizer"], help="Update rule (Adam 0.9/0.999/1e-8, AdaGrad "
                                            "eps 1e-6, SGD)."),
    lr: float = typer.Option(_D["lr"], help="Learning rate."),
    clip: float = typer.Option(_D["clip"], help="Element-wise gradient clipping bound; 0 disables."),
    word_dim: int = typer.Option(_D["word_dim"], help="Word embedding size."),
    feature_dim: int = typer.Option(_D["feature_dim"], help="Embedding size of each of the 7 shape features."),
    word_dropout: float = typer.Option(_D["word_dropout"], help="alpha: a word seen c times becomes UNK with "
                                       "probability alpha / (alpha + c)."),
    tagset: TagSet = typer.Option(_D["tagset"], help="xpos (Penn Treebank tags in EWT) or upos."),
    chunks: int = typer.Option(_D["chunks"], help="Dev evaluations (and meSimp prune steps) per epoch."),
    prune_threshold: float = typer.Option(_D["prune_threshold"], help="meSimp: drop units with "
                                          "hits < floor(refer * threshold)."),
    cycle: int = typer.Option(_D["cycle"], help="meSimp: epochs per cycle; prune in even cycles, fixed units in "
                              "odd ones; 0: always."),
    seed: int = typer.Option(_D["seed"], help="Random seed: same seed, same run."),
    device: str = typer.Option(_D["device"], help="cpu, cuda or cuda:N."),
    backend: str = typer.Option(_D["backend"], help="meProp kernels: auto, cpu, torch, triton, cupy, reference."),
    threads: Optional[int] = typer.Option(_D["threads"], help="torch CPU threads (default: torch's choice; 1 helps "
                                          "on a busy machine)."),
    data_dir: Optional[Path] = typer.Option(_D["data_dir"], help="Folder with one *train, *dev and *test "
                                            ".conllu[.gz] file."),
    train_file: Optional[Path] = typer.Option(_D["train_file"], help="Training CoNLL-U file (instead of --data-dir)."),
    dev_file: Optional[Path] = typer.Option(_D["dev_file"], help="Dev CoNLL-U file (instead of --data-dir)."),
    test_file: Optional[Path] = typer.Option(_D["test_file"], help="Test CoNLL-U file (instead of --data-dir)."),
    out: Path = typer.Option(Path(_D["out"]), help="Folder for results.json, checkpoint.pt and curves.png."),
    limit: Optional[int] = typer.Option(_D["limit"], help="Train on the first N sentences only (quick runs)."),
    resume: bool = typer.Option(False, help="Continue the run whose checkpoint is in --out."),
    progress: bool = typer.Option(_D["progress"], help="Show a progress bar."),
) -> None:
    """Train the POS tagger (meProp LSTM) on a CoNLL-U treebank; prints the test accuracy at the best dev score."""
    from mesimp_gpu.cli import user_errors  # the CLI's error handling; imported here because cli imports this module

    def text(path: Path | None) -> str | None:
        return None if path is None else str(path)

    with user_errors():
        config = PosConfig(
            method=method, k=k, selection=selection, counting=counting, hidden=hidden, bidirectional=bidirectional,
            epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, clip=clip or None, word_dim=word_dim,
            feature_dim=feature_dim, word_dropout=word_dropout, tagset=tagset, chunks=chunks,
            prune_threshold=prune_threshold, cycle=cycle, seed=seed, device=device, backend=backend,
            threads=threads, data_dir=text(data_dir), train_file=text(train_file), dev_file=text(dev_file),
            test_file=text(test_file), out=str(out), limit=limit, progress=progress,
        )
        results = train_pos(config, resume=resume)
    final = results["final"]
    times = final["mean_epoch_seconds"]
    typer.echo(
        f"test accuracy {final['test_acc_at_best_dev']:.2f}% at best dev {final['best_dev_acc']:.2f}% | "
        f"sizes {'-'.join(map(str, final['sizes']))} | per epoch: forward {times['forward']:.1f}s, "
        f"backward {times['backward']:.1f}s, update {times['update']:.1f}s | results in {out / 'results.json'}"
    )

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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import typer
from tqdm import tqdm

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
from mesimp_gpu.lstm import GateSelection, HitCounting
from mesimp_gpu.meprop import MePropConfig
from mesimp_gpu.mesimp import check_threshold, ends_cycle, prunes_in
from mesimp_gpu.models.tagger import Tagger
from mesimp_gpu.optim import OptimizerName, reset_moments
from mesimp_gpu.train.common import METHOD_MODE, Method, Trainer, check_run_settings, chunk_bounds

SPLITS = ("train", "dev", "test")
EVAL_BATCH = 256  # sentences per evaluation batch (no gradients, so memory is small)


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
    #: lazy optimizers need touched-row records, which the LSTM does not leave: always a dense update
    lazy: ClassVar[bool] = False
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
        check_run_settings(self, {"k": self.k, "hidden": self.hidden, "epochs": self.epochs,
                                  "batch_size": self.batch_size, "word_dim": self.word_dim,
                                  "feature_dim": self.feature_dim, "chunks": self.chunks})
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


class PosTrainer(Trainer):
    """One tagging run: data, vocabularies, the tagger, and the shared bookkeeping."""

    resumable_changes = RESUMABLE_CHANGES
    title = "POS tagging"

    def __init__(self, config: PosConfig, splits: dict[str, list[Sentence]] | None = None) -> None:
        super().__init__(config)
        c = config
        if splits is None:
            splits, paths = load_splits(c)
            self.sources = {s: str(p) for s, p in paths.items()}
        else:
            self.sources = {s: "<given>" for s in SPLITS}
        self.vocab = TaggingVocab.build(splits["train"], c.tagset)
        self.data: dict[str, list[EncodedSentence]] = {s: [self.vocab.encode(x) for x in splits[s]] for s in SPLITS}
        self.counts = word_counts(self.vocab.words).to(self.device)
        self.start()

    def build_model(self, hidden_sizes: list[int] | None) -> Tagger:
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

    @property
    def sizes(self) -> list[int]:
        """``[input, hidden per direction..., tags]``: the layer widths, as the MLP reports them."""
        lstm = self.model.lstm
        return [lstm.input_size, *[d.hidden_size for d in lstm.directions], len(self.vocab.tags)]

    def architecture_state(self) -> dict[str, Any]:
        return {**super().architecture_state(), "refer": [d.refer for d in self.model.lstm.directions]}

    def restore_records(self, state: dict[str, Any]) -> None:
        for d, refer in zip(self.model.lstm.directions, state["refer"]):
            d.refer = refer

    def after_piece(self, epoch: int, chunk: int, last: bool) -> dict[str, Any]:
        """After a piece (meSimp only): prune in pruning epochs, reset Adam's moments at a cycle's end."""
        c = self.config
        if c.method is not Method.MESIMP:
            return {}
        record = {"pruned": prunes_in(epoch, c.cycle), "moments_reset": last and ends_cycle(epoch, c.cycle)}
        if record["pruned"]:
            self.model.mesimp_prune_(c.prune_threshold, self.optimizer)
        if record["moments_reset"]:
            reset_moments(self.optimizer)
        return record

    def piece_steps(self, piece: list[list[int]]) -> int:
        return len(piece)

    def epoch_pieces(self, epoch: int) -> list[list[list[int]]]:
        """Per piece, the batches (sentence indices) of ``epoch``; depends only on the seed and the epoch."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed * 100_003 + epoch)
        order = torch.randperm(len(self.data["train"]), generator=generator).tolist()
        lengths = [len(s.words) for s in self.data["train"]]
        pieces = chunk_bounds(len(order), c.chunks)
        return [length_batches(order[a:b], lengths, c.batch_size, generator) for a, b in pieces]

    def train_piece(self, batches: list[list[int]], bar: tqdm | None) -> float:
        """Update steps over ``batches``; returns the mean loss per token."""
        total, tokens = 0.0, 0
        self.model.train()
        for indices in batches:
            batch = make_batch([self.data["train"][i] for i in indices]).to(self.device)
            value = self.update_step(lambda: self.batch_loss(batch))  # noqa: B023 - called at once
            n = int(batch.lengths.sum())
            total, tokens = total + value, tokens + n
            self.step_postfix(bar, value / n)
        return total / max(tokens, 1)

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """Summed token loss of ``batch``, with word dropout on its words."""
        words = word_dropout(batch.words, self.counts, self.config.word_dropout)
        return self.model.loss(self.model(Batch(words, batch.features, batch.tags, batch.lengths)), batch.tags)

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
        return self.record(epoch, chunk, loss, self.accuracy("dev"), lambda: self.accuracy("test"), extra)

    def results(self, final: bool = False) -> dict[str, Any]:
        """The results document: the shared core plus where the data came from and its size."""
        results = self.results_core("pos", final)
        results["data"] = {s: {"source": self.sources[s], "sentences": len(self.data[s]),
                               "tokens": sum(len(x.words) for x in self.data[s])} for s in SPLITS} | {
            "words": len(self.vocab.words), "tags": len(self.vocab.tags)}
        return results


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

"""Train the POS tagger (meProp LSTM) on a CoNLL-U treebank: dense, meProp variants or meSimp.

Data: ``--train/--dev/--test`` files, or a ``--data-dir`` holding one ``*train.conllu[.gz]``, one
``*dev.conllu[.gz]`` and one ``*test.conllu[.gz]`` (the UD file names). Vocabularies come from train.

Presets (:data:`PRESETS`, ``--preset``): ``paper``, the meProp paper's tagger (one left-to-right LSTM of
500 units, k 5 per gate, word embedding 50 and 7 shape features of 20, no character model, no dropout;
batches of 16 sentences instead of the paper's 1, for speed), and ``competitive``, a modern tagger (a
bidirectional LSTM, a character CNN, dropout, learning-rate decay, a fixed budget of epochs). The method
and ``k`` stay the user's choice, so dense, meProp and meSimp runs of one preset share every other setting.

Schedule (as the MNIST trainer): each epoch is shuffled and cut into ``chunks`` pieces; within a piece
sentences of similar length are batched together (less padding) and the batches run in random order.
After each piece the dev set is scored, and the test set when dev improved; the reported test accuracy
is the one at the best dev accuracy. Checkpoint and results are rewritten after every piece, so
``resume`` continues from the last finished piece.

meSimp schedule: the one every trainer shares (:class:`~mesimp_gpu.mesimp.MesimpSchedule`, the same
options as ``train mnist``). Cycles of ``cycle`` epochs; in even cycles a prune step
(:meth:`~mesimp_gpu.models.tagger.Tagger.mesimp_prune_`) follows every piece, before its evaluation; in odd
cycles the kept units stay fixed while the hit record keeps counting. Adam's moments are reset as
``reset_moments`` says. ``cycle = 0`` prunes after every piece of every epoch. With the default
``cycle = 5`` a short run (up to 5 epochs) prunes after every piece. ``compare_same_size`` then trains a
dense tagger of the final per-direction sizes from scratch with the same settings (``out/same-size``).

Learning rate: ``lr * lr_decay ** epoch`` in each epoch (a function of the epoch alone, so a resumed run
sets the same).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from mesimp_gpu.data.conllu import (
    IGNORE_TAG,
    Batch,
    EncodedSentence,
    Sentence,
    TaggingVocab,
    TagSet,
    make_batch,
    word_counts,
    word_dropout,
)
from mesimp_gpu.lstm import GateSelection, HitCounting
from mesimp_gpu.meprop import MePropConfig
from mesimp_gpu.mesimp import MomentReset
from mesimp_gpu.models.tagger import Tagger, save_tagger
from mesimp_gpu.optim import OptimizerName
from mesimp_gpu.train.settings import METHOD_MODE, Method, check_run_settings, with_preset
from mesimp_gpu.train.trainer import PieceHook, Trainer, chunk_bounds, run_with_baseline
from mesimp_gpu.train.treebank import SPLITS, check_treebank_settings, given_or_loaded

EVAL_BATCH = 256  # sentences per evaluation batch (no gradients, so memory is small)


@dataclass(frozen=True)
class PosConfig:
    """Every setting of ``mesimp-gpu train pos``; the CLI options mirror these fields."""

    method: Method = Method.MEPROP  # dense | meprop | unified | random | mesimp
    k: int = 5  # gate-gradient entries kept per example and step (per gate with selection per-gate)
    selection: GateSelection = GateSelection.PER_GATE  # top-k over all 4H gate entries, or k per gate
    counting: HitCounting = HitCounting.ANY  # meSimp: a unit hit once per token (any) or per selected gate
    hidden: int = 500  # LSTM hidden size (per direction)
    hidden_sizes: Optional[tuple[int, ...]] = None  # per-direction sizes (e.g. meSimp's result); overrides hidden
    bidirectional: bool = False  # the paper's tagger reads left to right
    epochs: int = 2  # passes over the training sentences
    batch_size: int = 16  # sentences per update (the paper: 1)
    optimizer: OptimizerName = OptimizerName.ADAM
    lr: float = 1e-3  # learning rate (the papers: Adam 0.001, AdaGrad 0.01 for POS)
    lr_decay: float = 1.0  # the learning rate of epoch e is lr * lr_decay ** e
    clip: Optional[float] = 5.0  # element-wise gradient clipping; None disables
    lazy: bool = False  # update only the LSTM weight rows meProp touched (mesimp_gpu.lazy_optim)
    word_dim: int = 50  # word embedding size
    feature_dim: int = 20  # embedding size of each of the 7 shape features
    char_dim: int = 30  # character embedding size of the character CNN
    char_filters: int = 0  # character CNN output size (filters of width 3); 0: no character model (the paper)
    dropout: float = 0.0  # dropout on the LSTM's input and output
    word_dropout: float = 0.25  # alpha: a word of train count c becomes UNK with probability alpha / (alpha + c)
    tagset: TagSet = TagSet.XPOS  # xpos (Penn Treebank in EWT) or upos
    chunks: int = 4  # dev evaluations per epoch
    prune: float = 0.1  # meSimp: remove units with hits < floor(refer * prune), in [0, 1)
    cycle: int = 5  # meSimp: epochs per cycle; prune in even cycles, fixed in odd ones; 0: always prune
    reset_moments: MomentReset = MomentReset.CYCLE  # meSimp: when Adam's m and v (not t) are zeroed
    nonzero_hits: bool = False  # meSimp: count only selected non-zero gradients as hits (reference: all)
    compare_same_size: bool = False  # meSimp: then train a dense tagger of the final sizes from scratch
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
                                  "feature_dim": self.feature_dim, "char_dim": self.char_dim, "chunks": self.chunks})
        if self.word_dropout < 0:
            raise ValueError(f"--word-dropout must be >= 0, got {self.word_dropout}")
        if self.char_filters < 0:
            raise ValueError(f"--char-filters must be >= 0 (0: no character model), got {self.char_filters}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"--lr-decay must be in (0, 1] (1: a constant rate), got {self.lr_decay}")
        directions = 2 if self.bidirectional else 1
        if self.hidden_sizes is not None and (len(self.hidden_sizes) != directions or min(self.hidden_sizes) < 1):
            raise ValueError(f"--hidden-sizes needs {directions} positive size(s), one per LSTM direction; got "
                             f"{list(self.hidden_sizes)}")
        if self.compare_same_size and self.method is not Method.MESIMP:
            raise ValueError("--compare-same-size needs --method mesimp (it compares with the simplified size)")
        check_treebank_settings(self)


class Preset(str, enum.Enum):
    """Named sets of settings for ``train pos --preset``."""

    PAPER = "paper"  # the meProp paper's tagger: one left-to-right LSTM of 500, k 5 per gate, no character model
    COMPETITIVE = "competitive"  # a bidirectional LSTM over words, shape features and a character CNN, dropout


#: preset -> settings; options given explicitly on the command line override them
PRESETS: dict[Preset, dict[str, Any]] = {
    Preset.PAPER: dict(
        k=5, selection=GateSelection.PER_GATE, hidden=500, bidirectional=False, word_dim=50, feature_dim=20,
        char_filters=0, dropout=0.0, batch_size=16, optimizer=OptimizerName.ADAM, lr=1e-3, lr_decay=1.0,
    ),
    Preset.COMPETITIVE: dict(
        hidden=200, bidirectional=True, word_dim=100, feature_dim=20, char_dim=30, char_filters=64, dropout=0.33,
        batch_size=32, optimizer=OptimizerName.ADAM, lr=2e-3, lr_decay=0.9, clip=5.0, epochs=8, chunks=2,
    ),
}


def pos_config(preset: Preset | None = None, **settings: Any) -> PosConfig:
    """A :class:`PosConfig` from ``preset`` (if any) with ``settings`` on top; unknown names are errors."""
    return with_preset(PosConfig, PRESETS[preset] if preset else {}, settings, "tagger")


#: settings that may differ between a run and its resumption
RESUMABLE_CHANGES = frozenset({"epochs", "progress", "device", "backend", "threads", "data_dir", "train_file",
                               "dev_file", "test_file", "out", "compare_same_size"})


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

    def __init__(
        self, config: PosConfig, splits: dict[str, list[Sentence]] | None = None, hooks: tuple[PieceHook, ...] = ()
    ) -> None:
        super().__init__(config, hooks)
        c = config
        splits, self.sources = given_or_loaded(c, splits)
        self.splits = splits  # kept for a same-size baseline
        self.vocab = TaggingVocab.build(splits["train"], c.tagset)
        self.data: dict[str, list[EncodedSentence]] = {s: [self.vocab.encode(x) for x in splits[s]] for s in SPLITS}
        self.counts = word_counts(self.vocab.words).to(self.device)
        self.start()

    def build_model(self, hidden_sizes: list[int] | None) -> Tagger:
        """The tagger with this run's settings; ``hidden_sizes`` (per direction) for a pruned checkpoint."""
        c = self.config
        model = Tagger(
            len(self.vocab.words), [len(v) for v in self.vocab.features.values()], len(self.vocab.tags),
            MePropConfig(METHOD_MODE[c.method], c.k, c.backend, nonzero_hits=c.nonzero_hits),
            hidden=max(c.hidden_sizes) if c.hidden_sizes else c.hidden, word_dim=c.word_dim,
            feature_dim=c.feature_dim, bidirectional=c.bidirectional, selection=c.selection, counting=c.counting,
            track_hits=c.method is Method.MESIMP, char_vocab_size=len(self.vocab.chars), char_dim=c.char_dim,
            char_filters=c.char_filters, dropout=c.dropout,
        )
        sizes = hidden_sizes if hidden_sizes is not None else c.hidden_sizes
        if sizes is not None:
            # a pruned checkpoint: which units are kept does not matter, load_state_dict overwrites them;
            # configured sizes: the first units of each direction, initialised as any others
            model.shrink_to_(list(sizes))
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

    def piece_steps(self, piece: list[list[int]]) -> int:
        return len(piece)

    def epoch_pieces(self, epoch: int) -> list[list[list[int]]]:
        """Per piece, the batches (sentence indices) of ``epoch``; depends only on the seed and the epoch.
        Also sets the epoch's learning rate, ``lr * lr_decay ** epoch``."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * c.lr_decay**epoch
        generator = torch.Generator().manual_seed(c.seed * 100_003 + epoch)
        order = torch.randperm(len(self.data["train"]), generator=generator).tolist()
        lengths = [len(s.words) for s in self.data["train"]]
        pieces = chunk_bounds(len(order), c.chunks)
        return [length_batches(order[a:b], lengths, c.batch_size, generator) for a, b in pieces]

    def train_piece(self, batches: list[list[int]], bar: tqdm | None) -> float:
        """Update steps over ``batches``; returns the mean loss per token (of several processes: this process's
        share of it)."""
        total, tokens = 0.0, 0
        self.model.train()
        for indices in batches:
            tokens += sum(len(self.data["train"][i].words) for i in indices)  # of the whole minibatch
            batch = make_batch([self.data["train"][i] for i in self.dist.shard(indices, mean_loss=False)]).to(self.device)
            value = self.update_step(lambda: self.batch_loss(batch))  # noqa: B023 - called at once
            total += value
            self.step_postfix(bar, value / max(int(batch.lengths.sum()), 1))
        return total / max(tokens, 1)

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """Summed token loss of ``batch``, with word dropout on its words."""
        words = word_dropout(batch.words, self.counts, self.config.word_dropout)
        return self.model.loss(self.net(replace(batch, words=words)), batch.tags)

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

    def save_model(self, directory: Path) -> None:
        save_tagger(self.model, self.vocab.state_dict(), directory)

    def results(self, final: bool = False) -> dict[str, Any]:
        """The results document: the shared core plus where the data came from and its size."""
        results = self.results_core("pos", final)
        results["data"] = {s: {"source": self.sources[s], "sentences": len(self.data[s]),
                               "tokens": sum(len(x.words) for x in self.data[s])} for s in SPLITS} | {
            "words": len(self.vocab.words), "tags": len(self.vocab.tags)}
        return results


def same_size_config(config: PosConfig, kept: list[int]) -> PosConfig:
    """The baseline of ``config``'s meSimp run: a dense tagger of the ``kept`` per-direction sizes trained from
    scratch with the same settings and budget, written to ``out/same-size``."""
    return replace(config, method=Method.DENSE, hidden_sizes=tuple(kept), compare_same_size=False,
                   out=str(Path(config.out) / "same-size"))


def train_pos(
    config: PosConfig, resume: bool = False, splits: dict[str, list[Sentence]] | None = None,
    hooks: tuple[PieceHook, ...] = (),
) -> dict[str, Any]:
    """Train as ``config`` says (continuing ``config.out``'s checkpoint when ``resume``); returns the results.

    With ``compare_same_size`` the results gain ``same_size``, the final metrics of the dense baseline.
    """
    trainer = PosTrainer(config, splits, hooks)
    baseline = None
    if config.compare_same_size:
        baseline = lambda kept: PosTrainer(same_size_config(config, kept), trainer.splits)  # noqa: E731
    initial = list(config.hidden_sizes) if config.hidden_sizes else [config.hidden] * (2 if config.bidirectional else 1)
    return run_with_baseline(trainer, resume, baseline, initial)

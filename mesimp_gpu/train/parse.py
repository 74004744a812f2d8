"""Train the transition parser (Chen & Manning style MLP) on a CoNLL-U treebank: dense, meProp or meSimp.

Data: the treebank's train/dev/test files (:mod:`mesimp_gpu.train.treebank`). Training examples are the
static oracle's configurations of the projective training trees (non-projective ones are skipped and
counted in the results); every dev and test sentence is parsed, greedily with legal transitions only.

Schedule (as the other trainers): each epoch's transitions are shuffled and cut into ``chunks`` pieces
of minibatches of ``batch_size`` transitions. After each piece dev is parsed and scored, and test too
when dev improved; the model is selected on dev UAS over all words (CoNLL 2018 convention). Both scoring
conventions are reported (:mod:`mesimp_gpu.parsing.scoring`). meSimp prunes hidden units by the shared
schedule (:class:`~mesimp_gpu.mesimp.MesimpSchedule`) between a piece and its evaluation.

Loss: mean cross-entropy over the minibatch plus ``l2 / 2`` times the squared norm of the dense parts
(embeddings and output layer, Chen & Manning's L2); the hidden layer is left out so that its gradient
stays meProp's sparse one.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mesimp_gpu.data.conllu import Sentence, TagSet, word_dropout
from mesimp_gpu.meprop import MePropConfig
from mesimp_gpu.mesimp import MomentReset
from mesimp_gpu.models.parser import Activation, Parser, ParserShape, save_parser
from mesimp_gpu.optim import OptimizerName
from mesimp_gpu.parsing.decode import parse_sentences
from mesimp_gpu.parsing.features import N_WORD_FEATURES, ParserVocab, training_examples
from mesimp_gpu.parsing.scoring import ParseScores, attachment_scores
from mesimp_gpu.train.inference import DECODE_BATCH, LoadedTagger
from mesimp_gpu.train.records import PHASES
from mesimp_gpu.train.settings import METHOD_MODE, Method, check_run_settings, with_preset
from mesimp_gpu.train.trainer import PieceHook, Trainer, chunk_bounds, run_with_baseline
from mesimp_gpu.train.treebank import SPLITS, check_treebank_settings, given_or_loaded

@dataclass(frozen=True)
class ParseConfig:
    """Every setting of ``mesimp-gpu train parse``; the CLI options mirror these fields."""

    method: Method = Method.MESIMP  # mesimp | dense | meprop | unified | random
    k: int = 20  # hidden-layer gradient entries kept per transition (the papers: 20)
    hidden: int = 500  # hidden units (the papers: 500; Chen & Manning: 200)
    dim: int = 50  # embedding size of words, tags and labels
    activation: Activation = Activation.CUBE  # cube (Chen & Manning; measured the better here) or relu
    dropout: float = 0.5  # on the hidden layer's output (Chen & Manning)
    input_dropout: float = 0.0  # on the concatenated embeddings
    l2: float = 1e-8  # L2 on the embeddings and the output layer (Chen & Manning)
    word_dropout: float = 0.25  # alpha: a word feature of train count c becomes UNK with probability alpha / (alpha + c)
    epochs: int = 2  # passes over the training transitions
    batch_size: int = 1000  # transitions per update (the meProp paper: 10,000)
    optimizer: OptimizerName = OptimizerName.ADAM
    lr: float = 1e-3  # learning rate (Chen & Manning and the meProp paper: AdaGrad 0.01)
    clip: Optional[float] = None  # element-wise gradient clipping; None disables
    lazy: bool = False  # update only the hidden weight rows meProp touched (mesimp_gpu.lazy_optim)
    tagset: TagSet = TagSet.XPOS  # input tags: xpos (Penn Treebank in EWT) or upos
    tagger: Optional[str] = None  # a `train pos` run folder: dev and test are parsed on its predicted tags
    chunks: int = 2  # dev evaluations (and meSimp prune steps) per epoch
    prune: float = 0.1  # meSimp: remove units with hits < floor(refer * prune), in [0, 1)
    cycle: int = 1  # meSimp: epochs per cycle; prune in even cycles, fixed in odd ones; 0: always prune
    reset_moments: MomentReset = MomentReset.CYCLE  # meSimp: when Adam's m and v (not t) are zeroed
    nonzero_hits: bool = False  # meSimp: count only selected non-zero gradients as hits (reference: all)
    compare_same_size: bool = False  # meSimp: then train a dense parser of the final size from scratch
    seed: int = 1  # seeds initialisation, shuffling, dropout and random selection
    device: str = "cpu"  # cpu, cuda or cuda:N
    backend: str = "auto"  # meProp backend, see mesimp_gpu.backends
    threads: Optional[int] = None  # torch CPU threads; None keeps torch's default
    data_dir: Optional[str] = None  # folder with *train/*dev/*test.conllu[.gz]
    train_file: Optional[str] = None  # explicit files override data_dir
    dev_file: Optional[str] = None
    test_file: Optional[str] = None
    out: str = "runs/parse"  # folder for results.json, checkpoint.pt, the model and plots
    limit: Optional[int] = None  # use only the first N training (and N // 10, at least 100, dev/test) sentences
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        check_run_settings(self, {"k": self.k, "hidden": self.hidden, "dim": self.dim, "epochs": self.epochs,
                                  "batch_size": self.batch_size, "chunks": self.chunks})
        check_treebank_settings(self)
        for name in ("dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not self.l2 >= 0.0:
            raise ValueError(f"--l2 must be >= 0, got {self.l2}")
        if not self.word_dropout >= 0.0:
            raise ValueError(f"--word-dropout must be >= 0, got {self.word_dropout}")
        if self.compare_same_size and self.method is not Method.MESIMP:
            raise ValueError("--compare-same-size needs --method mesimp (it compares with the simplified size)")
        if self.method is not Method.DENSE and self.k > self.hidden:
            raise ValueError(f"--k {self.k} exceeds the hidden width {self.hidden}; use --method dense for full "
                             f"back propagation or choose k <= {self.hidden}")


class Preset(str, enum.Enum):
    """Named sets of settings for ``train parse --preset``."""

    PAPER = "paper"  # Chen & Manning's training with the meProp/meSimp papers' network and k


#: preset -> settings; options given explicitly on the command line override them
PRESETS: dict[Preset, dict[str, Any]] = {
    Preset.PAPER: dict(
        k=20, hidden=500, dim=50, activation=Activation.CUBE, dropout=0.5, l2=1e-8, batch_size=10_000,
        optimizer=OptimizerName.ADAGRAD, lr=0.01, clip=None,
    ),
}


def parse_config(preset: Preset | None = None, **settings: Any) -> ParseConfig:
    """A :class:`ParseConfig` from ``preset`` (if any) with ``settings`` on top; unknown names are errors."""
    return with_preset(ParseConfig, PRESETS[preset] if preset else {}, settings, "parser")


#: settings that may differ between a run and its resumption
RESUMABLE_CHANGES = frozenset({"epochs", "progress", "device", "backend", "threads", "data_dir", "train_file",
                               "dev_file", "test_file", "out", "compare_same_size", "tagger"})


class ParseTrainer(Trainer):
    """One parsing run: oracle transitions, the parser, and the shared loop (meSimp schedule, records)."""

    resumable_changes = RESUMABLE_CHANGES
    title = "Parsing"

    def __init__(
        self, config: ParseConfig, splits: dict[str, list[Sentence]] | None = None, hooks: tuple[PieceHook, ...] = ()
    ) -> None:
        super().__init__(config, hooks)
        splits, self.sources = given_or_loaded(config, splits, require_trees=True)
        self.tagging: dict[str, Any] = {}
        if config.tagger is not None:
            splits = self.predicted_tags(splits, config.tagger)
        self.sentences = splits
        self.vocab = ParserVocab.build(splits["train"], config.tagset)
        start = time.perf_counter()
        examples = training_examples(splits["train"], self.vocab)
        self.features, self.transitions = examples.features.to(self.device), examples.transitions.to(self.device)
        self.non_projective = examples.non_projective
        self.oracle_seconds = time.perf_counter() - start
        if len(self.transitions) == 0:
            raise ValueError(f"{self.sources['train']}: no projective training tree, nothing to train on")
        self.unseen_labels = {split: self.count_unseen_labels(splits[split]) for split in ("dev", "test")}
        self.word_counts = self.vocab.word_counts().to(self.device)
        self.start()

    def predicted_tags(self, splits: dict[str, list[Sentence]], tagger_dir: str) -> dict[str, list[Sentence]]:
        """``splits`` with dev and test retagged by the saved tagger (train keeps its gold tags, which a tagger
        trained on it reproduces almost exactly anyway); the tagger's accuracy goes into the results."""
        tagger = LoadedTagger(tagger_dir, self.config.device)
        if tagger.vocab.tagset is not self.config.tagset:
            raise ValueError(f"--tagger {tagger_dir} predicts {tagger.vocab.tagset.value} tags but the parser reads "
                             f"{self.config.tagset.value}; pass --tagset {tagger.vocab.tagset.value}")
        retagged = dict(splits)
        for split in ("dev", "test"):
            retagged[split] = tagger.retag(splits[split])
            gold = [t for s in splits[split] for t in s.tags(self.config.tagset)]
            predicted = [t for s in retagged[split] for t in s.tags(self.config.tagset)]
            self.tagging[split] = 100.0 * sum(p == g for p, g in zip(predicted, gold)) / len(gold)
        self.tagging["tagger"] = tagger_dir
        return retagged

    def count_unseen_labels(self, sentences: list[Sentence]) -> int:
        """Words whose gold DEPREL never occurs in train (scored as errors in LAS, never crash)."""
        known = set(self.vocab.system.labels)
        return sum(d not in known for s in sentences for d in s.deprels)

    def build_model(self, hidden_sizes: list[int] | None) -> Parser:
        """The parser with this run's settings; ``hidden_sizes`` (``[units]``) for a shrunk checkpoint."""
        c = self.config
        shape = ParserShape(len(self.vocab.words), len(self.vocab.tags), len(self.vocab.labels),
                            self.vocab.system.n_outputs, hidden=c.hidden if hidden_sizes is None else hidden_sizes[0],
                            dim=c.dim, activation=c.activation, dropout=c.dropout, input_dropout=c.input_dropout)
        meprop = MePropConfig(METHOD_MODE[c.method], c.k, c.backend, nonzero_hits=c.nonzero_hits)
        return Parser(shape, meprop, track_hits=c.method is Method.MESIMP).to(self.device)

    @property
    def sizes(self) -> list[int]:
        """``[inputs, hidden, transitions]``: the layer widths, as the MLP reports them."""
        return [self.model.hidden.in_features, self.model.hidden_size, self.vocab.system.n_outputs]

    def architecture_state(self) -> dict[str, Any]:
        return {**super().architecture_state(), "refer": [self.model.hidden.refer]}

    def restore_records(self, state: dict[str, Any]) -> None:
        self.model.hidden.refer = state["refer"][0]

    def epoch_pieces(self, epoch: int) -> list[Tensor]:
        """The shuffled transition indices of ``epoch``, cut into ``chunks`` pieces."""
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(len(self.transitions), generator=generator).to(self.device)
        return [order[a:b] for a, b in chunk_bounds(len(order), self.config.chunks)]

    def piece_steps(self, piece: Tensor) -> int:
        return -(-len(piece) // self.config.batch_size)

    def batch_loss(self, batch: Tensor) -> Tensor:
        """Mean cross-entropy of the transitions ``batch`` (indices), with word dropout on the word features,
        plus the L2 term on the dense parts."""
        features = self.features[batch]  # (B, 48)
        words = word_dropout(features[:, :N_WORD_FEATURES], self.word_counts, self.config.word_dropout)
        logits = self.net(torch.cat([words, features[:, N_WORD_FEATURES:]], dim=1))
        loss = nn.functional.cross_entropy(logits, self.transitions[batch])
        if self.config.l2:
            loss = loss + 0.5 * self.config.l2 * sum(p.pow(2).sum() for p in self.model.dense_parameters())
        return loss

    def train_piece(self, order: Tensor, bar: tqdm | None) -> float:
        """Update steps over the transitions ``order``; returns the mean loss per transition."""
        self.model.train()
        total = 0.0
        for start in range(0, len(order), self.config.batch_size):
            batch = self.dist.shard(order[start : start + self.config.batch_size], mean_loss=True)
            value = self.update_step(lambda: self.batch_loss(batch))  # noqa: B023 - called at once
            total += value * len(batch)
            self.step_postfix(bar, value)
        return total / max(len(order), 1)

    def parse(self, sentences: list[Sentence]) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
        """Greedy parses of ``sentences`` with the current model (evaluation mode)."""
        self.model.eval()
        try:
            return parse_sentences(sentences, self.vocab, lambda f: self.model(f.to(self.device)), DECODE_BATCH)
        finally:
            self.model.train()

    def scores(self, split: str) -> ParseScores:
        """UAS/LAS of the current model on ``split`` (both conventions)."""
        return attachment_scores(self.sentences[split], self.parse(self.sentences[split]))

    def evaluate(self, epoch: int, chunk: int, loss: float, extra: dict[str, Any]) -> dict[str, Any]:
        """Parse dev (and test when dev improved); the history record carries every score."""
        dev = self.scores("dev").headline()
        test: dict[str, float] = {}

        def score_test() -> float:
            test.update(self.scores("test").headline())
            return test["uas"]

        entry = self.record(epoch, chunk, loss, dev["uas"], score_test, {**extra, "dev": dev})
        if test:
            entry["test"] = test
        return entry

    def save_model(self, directory: Path) -> None:
        save_parser(self.model, self.vocab.state_dict(), directory)

    def epoch_line(self, epoch: int) -> str:
        last = self.history[-1]
        return (f"epoch {epoch + 1}/{self.config.epochs}: loss {last['train_loss']:.4f}  dev UAS {last['dev_acc']:.2f} "
                f"LAS {last['dev']['las']:.2f}  best dev UAS {self.best.best_dev:.2f} "
                f"(test {self.best.test_at_best:.2f})  hidden {self.model.hidden_size}")

    def results(self, final: bool = False) -> dict[str, Any]:
        """The shared core plus the data's provenance and size, and the scores at the best dev (and at the end)."""
        results = self.results_core("parse", final)
        results["data"] = {s: {"source": self.sources[s], "sentences": len(self.sentences[s]),
                               "words": sum(len(x.words) for x in self.sentences[s])} for s in SPLITS} | {
            "train_transitions": len(self.transitions), "train_non_projective_skipped": self.non_projective,
            "oracle_seconds": self.oracle_seconds, "unseen_labels": self.unseen_labels,
            "words": len(self.vocab.words), "tags": len(self.vocab.tags), "labels": len(self.vocab.system.labels),
            "predicted_tags": self.tagging or None}
        at_best = next((r for r in self.history if r["step"] == self.best.best_step), None)
        results["final"].update({
            "dev_at_best": at_best["dev"] if at_best else None,
            "test_at_best_dev": at_best.get("test") if at_best else None,
            "kept_at_best_dev": at_best["sizes"][1] if at_best else None,
            "kept": self.model.hidden_size,
            "kept_fraction": self.model.hidden_size / self.config.hidden,
            "train_seconds": sum(t[p] for t in self.epoch_times for p in PHASES),
        })
        if final:
            # the network at the end may be smaller than the one at the best dev: score it too
            results["final"]["test_final_network"] = self.scores("test").headline()
        return results


def same_size_config(config: ParseConfig, kept: int) -> ParseConfig:
    """The baseline of ``config``'s meSimp run: a dense parser of ``kept`` hidden units trained from scratch
    with the same budget, written to ``out/same-size``."""
    return replace(config, method=Method.DENSE, hidden=kept, compare_same_size=False,
                   out=str(Path(config.out) / "same-size"))


def train_parse(config: ParseConfig, resume: bool = False, splits: dict[str, list[Sentence]] | None = None,
                hooks: tuple[PieceHook, ...] = ()) -> dict[str, Any]:
    """Train as ``config`` says (continuing ``config.out``'s checkpoint when ``resume``); returns the results.

    With ``compare_same_size`` the results gain ``same_size``, the final metrics of the dense baseline.
    """
    trainer = ParseTrainer(config, splits, hooks)
    baseline = None
    if config.compare_same_size:
        baseline = lambda kept: ParseTrainer(same_size_config(config, kept[0]), trainer.sentences)  # noqa: E731
    return run_with_baseline(trainer, resume, baseline, [config.hidden])


def summary_line(results: dict[str, Any]) -> str:
    """One line: test UAS/LAS (both conventions) at the best dev, hidden units kept, seconds per epoch."""
    final = results["final"]
    test = final["test_at_best_dev"] or {}
    epoch = sum(final["mean_epoch_seconds"].values())
    line = (f"test UAS {test.get('uas', 0):.2f} LAS {test.get('las', 0):.2f} (no punct: UAS "
            f"{test.get('uas_no_punct', 0):.2f} LAS {test.get('las_no_punct', 0):.2f}) at best dev UAS "
            f"{final['best_dev_acc']:.2f} | hidden {final['kept_at_best_dev']} at best, {final['kept']} at the end | "
            f"{epoch:.1f} s per epoch")
    if "same_size" in results:
        same = results["same_size"]["test_at_best_dev"] or {}
        line += f" | dense of the same size: test UAS {same.get('uas', 0):.2f}"
    return line


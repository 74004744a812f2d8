"""The ``parse`` suite: the transition parser trained dense, meProp and meSimp, then its decoding speed.

Training: ``train parse`` (Chen & Manning's MLP parser, ``parse_hidden`` hidden units, the trainer's
defaults otherwise: ReLU, Adam at 1e-3, batches of 1,000 transitions, two dev evaluations per epoch)
on the first ``parse_limit`` training sentences of a treebank, ``parse_epochs`` epochs per method,
the methods taking turns epoch by epoch as in the MNIST train suite (each run continued from its
checkpoint). meProp and meSimp keep ``parse_k`` gradient entries of the hidden layer; meSimp prunes
hidden units in the first epoch and trains the pruned network in the second (the trainer's cycle of
one epoch). A row per method: the median epoch split into forward, backward and update, the whole
run, speedups over dense, test UAS/LAS at the best dev score, and the hidden units kept.

Decoding (the meSimp paper's claim that simplification speeds up decoding): the dense parser and the
simplified one (the meSimp run's model at its best dev score, as ``train parse`` saves it) each parse
the dev split used in training (``parse_limit`` cuts it to ``max(N // 10, 100)`` sentences), greedily
in batches of sentences, timed side by side: one untimed pass each, then ``parse_decode_repeats``
rounds in which each parser does one full pass (in rotated order); median sentences per second with
the 20th/80th percentiles. A row per parser; the dev UAS of a timed pass is checked against the one
the trainer recorded, so the timed model is the reported one. Only the hidden layer shrinks: feature
extraction, the embeddings and the transition system cost the simplified parser as much as the dense
one, and bound the speedup of decoding.

The treebank: a folder with ``*train``, ``*dev`` and ``*test.conllu[.gz]`` (``ud_dir``, else the
environment variable ``MESIMP_UD_DIR``). Without one the suite gives a single skipped row saying why.
"""

from __future__ import annotations

import os
import tempfile
from functools import partial
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mesimp_gpu.backends import get_backend
from mesimp_gpu.bench.common import row
from mesimp_gpu.bench.config import BenchConfig, Provider, Suite
from mesimp_gpu.bench.timing import Clock, time_passes
from mesimp_gpu.bench.train import add_speedups, epoch_fields, take_turns
from mesimp_gpu.data.conllu import Sentence
from mesimp_gpu.parsing.scoring import attachment_scores
from mesimp_gpu.train.inference import DECODE_BATCH, LoadedParser
from mesimp_gpu.train.parse import ParseConfig, train_parse
from mesimp_gpu.train.settings import Method
from mesimp_gpu.train.treebank import load_splits

#: environment variable naming the treebank folder when ``--ud-dir`` is not given
UD_ENV = "MESIMP_UD_DIR"

#: how to give the suite a treebank (the end of every skip reason)
HOW_TO_POINT = (f"pass --ud-dir FOLDER or set {UD_ENV} to a folder holding one *train, *dev and *test.conllu[.gz] "
                "file (a Universal Dependencies treebank such as UD English EWT)")

#: the trained methods, in table order: dense (the baseline of every speedup) first
METHODS = (Method.DENSE, Method.MEPROP, Method.MESIMP)

#: the parser whose decoding is compared with dense: the simplified one
SIMPLIFIED = Method.MESIMP

#: largest accepted difference (percentage points) between the dev UAS of a timed decoding pass and the
#: trainer's record of the same model on the same sentences (the same computation: only float rounding)
DECODE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Treebank:
    """The sentences a suite (parse, tagger) trains and decodes on, and where they came from."""

    folder: str
    splits: dict[str, list[Sentence]]
    paths: dict[str, Path]

    @property
    def name(self) -> str:
        return Path(self.folder).name


def base_settings(config: BenchConfig, folder: str) -> ParseConfig:
    """The ``train parse`` settings every run of the suite shares (method, epochs and out vary)."""
    return ParseConfig(k=config.parse_k, hidden=config.parse_hidden, device=config.device, data_dir=folder,
                       limit=config.parse_limit, seed=config.seed + 1, progress=False)


def suite_treebank(config: BenchConfig, settings: Callable[[str], Any], require_trees: bool) -> Treebank | str:
    """The treebank of ``config`` read as the trainer ``settings(folder)`` would read it (its limit applied;
    ``require_trees``: every tree checked), or why there is none and how to give one."""
    folder = config.ud_dir or os.environ.get(UD_ENV)
    if not folder:
        return f"no treebank given: {HOW_TO_POINT}"
    try:
        splits, paths = load_splits(settings(folder), require_trees=require_trees)
    except (OSError, ValueError) as exc:  # missing folder or files, unreadable or malformed CoNLL-U
        return f"no usable treebank at {folder} ({exc}); {HOW_TO_POINT}"
    return Treebank(folder, splits, paths)


def load_treebank(config: BenchConfig) -> Treebank | str:
    """The parse suite's treebank (``parse_limit`` applied), or why there is none and how to give one."""
    return suite_treebank(config, lambda folder: base_settings(config, folder), require_trees=True)


def skipped_row(reason: str) -> dict[str, Any]:
    """The suite's only row when it cannot run."""
    return row(Suite.PARSE, Provider.DENSE, None, kind="skipped", label="parse", status="skipped", reason=reason)


def run_parse_suite(config: BenchConfig, device: torch.device, treebank: Treebank | str, clock: Clock,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train the parser by each method, taking turns by epoch, then time the decoding of dev; the rows.

    ``treebank`` is :func:`load_treebank`'s answer: a string gives one skipped row with that reason.
    """
    if isinstance(treebank, str):  # the runner has said so when it looked for the treebank
        return [skipped_row(treebank)]
    backend = get_backend("auto", device).name
    base = replace(base_settings(config, treebank.folder), backend=backend)
    sentences = len(treebank.splits["train"])
    with tempfile.TemporaryDirectory(prefix="mesimp-bench-parse-") as tmp:

        def train_to(name: str, epoch: int) -> tuple[ParseConfig, dict[str, Any]]:
            settings = replace(base, method=Method(name), epochs=epoch, out=str(Path(tmp) / name))
            k = "" if settings.method is Method.DENSE else f" (k={settings.k})"
            log(f"train parse {name}{k}: epoch {epoch}/{config.parse_epochs} on {sentences} sentences of "
                f"{treebank.name}")
            return settings, train_parse(settings, resume=epoch > 1, splits=treebank.splits)

        finished = take_turns([m.value for m in METHODS], config.parse_epochs, train_to)
        rows = [train_row(settings, results, treebank, config.parse_epochs) for settings, results in finished.values()]
        add_speedups(rows)
        trained = {name: (Path(settings.out), results) for name, (settings, results) in finished.items()}
        rows += decode_rows(config, clock, treebank, trained, log)
    return rows


def train_row(settings: ParseConfig, results: dict[str, Any], treebank: Treebank, epochs: int) -> dict[str, Any]:
    """One method's row: per-epoch phase seconds, scores at the best dev, hidden units kept."""
    method, data, final = settings.method, results["data"], results["final"]
    timing = epoch_fields(results["epoch_seconds"])
    test = final["test_at_best_dev"] or {}
    return row(
        Suite.PARSE, Provider.DENSE if method is Method.DENSE else Provider.TOPK, settings.backend, kind="train",
        method=method.value, label=method.value, k=None if method is Method.DENSE else settings.k,
        hidden=settings.hidden, dim=settings.dim, activation=settings.activation.value, batch=settings.batch_size,
        optimizer=settings.optimizer.value, lr=settings.lr, treebank=treebank.name,
        treebank_files={split: str(path) for split, path in treebank.paths.items()}, sentences=data["train"]["sentences"], transitions=data["train_transitions"],
        non_projective_skipped=data["train_non_projective_skipped"], dev_sentences=data["dev"]["sentences"],
        test_sentences=data["test"]["sentences"], epochs=epochs, **timing,
        transitions_per_s=data["train_transitions"] / timing["median_s"],
        test_uas=test.get("uas"), test_las=test.get("las"), test_uas_no_punct=test.get("uas_no_punct"),
        test_las_no_punct=test.get("las_no_punct"), dev_uas=final["best_dev_acc"], kept=final["kept"],
        kept_at_best_dev=final["kept_at_best_dev"], parameters_final=final["parameters_final"],
    )


def decode_rows(config: BenchConfig, clock: Clock, treebank: Treebank,
                trained: dict[str, tuple[Path, dict[str, Any]]], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Sentences per second of the dense and the simplified parser on dev, timed side by side; a row each."""
    dev = treebank.splits["dev"]
    names = [Method.DENSE.value, SIMPLIFIED.value]
    parsers = {name: LoadedParser(str(trained[name][0]), config.device) for name in names}
    log(f"parse decoding: dense ({parsers['dense'].model.hidden_size} hidden) and {SIMPLIFIED.value} "
        f"({parsers[SIMPLIFIED.value].model.hidden_size} hidden), {config.parse_decode_repeats} passes over "
        f"{len(dev)} dev sentences each")
    stats, last = time_passes({name: partial(parsers[name].parse, dev, DECODE_BATCH) for name in names},
                              config.parse_decode_repeats, clock, config)
    words = sum(len(s.words) for s in dev)
    dense = stats[0]
    rows = []
    for name, s in zip(names, stats):
        model = parsers[name].model
        scores = attachment_scores(dev, last[name]).headline()
        recorded = trained[name][1]["final"]["dev_at_best"]
        error = abs(scores["uas"] - recorded["uas"]) if recorded else None
        rows.append(row(
            Suite.PARSE, Provider.DENSE if name == Method.DENSE.value else Provider.SIMPLIFIED, None, kind="decode",
            method=name, label=f"{name} parser", hidden=model.hidden_size,
            parameters=sum(p.numel() for p in model.parameters()), treebank=treebank.name, split="dev",
            sentences=len(dev), words=words, batch=DECODE_BATCH, status="ok", median_s=s.median, p20_s=s.p20,
            p80_s=s.p80, repeats=s.repeats, sentences_per_s=len(dev) / s.median,
            sentences_per_s_p20=len(dev) / s.p80, sentences_per_s_p80=len(dev) / s.p20, words_per_s=words / s.median,
            speedup=dense.median / s.median, dev_uas=scores["uas"], dev_las=scores["las"], max_error=error,
            check_passed=error is not None and error <= DECODE_TOLERANCE,
        ))
    return rows

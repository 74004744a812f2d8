"""Applying saved models to text: ``mesimp-gpu tag`` and ``parse``, and scoring them on a file (``evaluate``).

A saved model is a run folder's ``model.json`` (architecture and vocabularies) beside ``model.pt``.
Unknown words, characters and affixes map to the vocabularies' UNK entries, so any input is accepted;
a tag never seen in training counts as an error when scoring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mesimp_gpu.backends import get_backend
from mesimp_gpu.data.conllu import Sentence, TaggingVocab, TagSet, make_batch, read_conllu, rewrite_conllu
from mesimp_gpu.models.parser import Parser, load_parser
from mesimp_gpu.models.tagger import Tagger, load_tagger
from mesimp_gpu.parsing.decode import parse_sentences
from mesimp_gpu.parsing.features import ParserVocab
from mesimp_gpu.parsing.scoring import attachment_scores
from mesimp_gpu.train.settings import resolve_device

#: sentences parsed together (one scorer call per transition step for all of them)
DECODE_BATCH = 1024
#: sentences tagged together
TAG_BATCH = 256


@dataclass(frozen=True)
class ApplyConfig:
    """Every setting of ``mesimp-gpu tag`` and ``mesimp-gpu parse``; the CLI options mirror these fields."""

    model: str  # a run folder of `train pos` / `train parse` (or its model.json)
    input: str  # CoNLL-U file (plain or gzip)
    output: str  # where the copy with the predicted columns goes
    device: str = "cpu"  # cpu, cuda or cuda:N
    batch_size: int = DECODE_BATCH  # sentences processed together

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if Path(self.input).resolve() == Path(self.output).resolve():
            raise ValueError(f"--output {self.output} is the input file; choose another path")


def tag_column(tagset: TagSet) -> str:
    """The CoNLL-U column a tag set lives in."""
    return "XPOS" if tagset is TagSet.XPOS else "UPOS"


class LoadedTagger:
    """A saved tagger with its vocabularies, on a device."""

    def __init__(self, model_path: str, device: str) -> None:
        self.device = resolve_device(device)
        self.model: Tagger
        self.model, vocab_state = load_tagger(model_path, self.device)
        self.vocab = TaggingVocab.from_state_dict(vocab_state)
        # import (or build) the LSTM's backend now: a first use inside a timed pass would count its import
        get_backend(self.model.lstm.config.backend, self.device)

    @torch.no_grad()
    def tag(self, sentences: list[Sentence], batch_size: int = TAG_BATCH) -> list[tuple[str, ...]]:
        """The predicted tags (the model's tag set) of every sentence, in input order."""
        order = sorted(range(len(sentences)), key=lambda k: len(sentences[k].words))  # less padding
        predicted: list[tuple[str, ...]] = [()] * len(sentences)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = make_batch([self.vocab.encode(sentences[k]) for k in chunk]).to(self.device)
            best = self.model(batch).argmax(dim=2).cpu()  # (B, T)
            for row, k in enumerate(chunk):
                predicted[k] = tuple(self.vocab.tags.itos[t] for t in best[row, : len(sentences[k].words)].tolist())
        return predicted

    def retag(self, sentences: list[Sentence]) -> list[Sentence]:
        """``sentences`` with their tag column (the model's tag set) replaced by the predicted tags."""
        field = "xpos" if self.vocab.tagset is TagSet.XPOS else "upos"
        return [replace(s, **{field: tags}) for s, tags in zip(sentences, self.tag(sentences))]


class LoadedParser:
    """A saved parser with its vocabularies, on a device."""

    def __init__(self, model_path: str, device: str) -> None:
        self.device = resolve_device(device)
        self.model: Parser
        self.model, vocab_state = load_parser(model_path, self.device)
        self.vocab = ParserVocab.from_state_dict(vocab_state)

    def parse(self, sentences: list[Sentence], batch_size: int = DECODE_BATCH) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
        """``(heads, deprels)`` per sentence (greedy, legal transitions only: single-rooted trees)."""
        missing = next((s for s in sentences if "_" in s.tags(self.vocab.tagset)), None)
        if missing is not None:
            raise ValueError(f"{missing.source}: the parser reads {tag_column(self.vocab.tagset)} tags, and this "
                             "sentence has none ('_'); tag the file first (mesimp-gpu tag)")
        return parse_sentences(sentences, self.vocab, lambda f: self.model(f.to(self.device)), batch_size)


def read_input(path: str) -> list[Sentence]:
    """The sentences of the CoNLL-U file ``path``; ValueError naming it when it holds none."""
    sentences = read_conllu(path)
    if not sentences:
        raise ValueError(f"{path}: no sentences in the file")
    return sentences


def speed(count: int, seconds: float) -> float:
    """Items per second (infinite for an immeasurably short time)."""
    return count / seconds if seconds > 0 else float("inf")


def tag_file(config: ApplyConfig) -> dict[str, Any]:
    """Tag ``config.input`` and write the copy with the predicted tag column; returns counts and speed."""
    tagger = LoadedTagger(config.model, config.device)
    sentences = read_input(config.input)
    start = time.perf_counter()
    tags = tagger.tag(sentences, config.batch_size)
    seconds = time.perf_counter() - start
    rewrite_conllu(config.input, config.output, ({tag_column(tagger.vocab.tagset): list(t)} for t in tags))
    tokens = sum(len(s.words) for s in sentences)
    return {"sentences": len(sentences), "tokens": tokens, "seconds": seconds, "tokens_per_second": speed(tokens, seconds),
            "column": tag_column(tagger.vocab.tagset)}


def parse_file(config: ApplyConfig) -> dict[str, Any]:
    """Parse ``config.input`` and write the copy with predicted HEAD and DEPREL; returns counts and speed."""
    parser = LoadedParser(config.model, config.device)
    sentences = read_input(config.input)
    start = time.perf_counter()
    parses = parser.parse(sentences, config.batch_size)
    seconds = time.perf_counter() - start
    rewrite_conllu(config.input, config.output, (
        {"HEAD": [str(h) for h in heads], "DEPREL": list(deprels)} for heads, deprels in parses
    ))
    return {"sentences": len(sentences), "words": sum(len(s.words) for s in sentences), "seconds": seconds,
            "sentences_per_second": speed(len(sentences), seconds)}


def evaluate_tagger(model: str, data: str, device: str) -> dict[str, Any]:
    """Token accuracy (%) of a saved tagger on the gold tags of the CoNLL-U file ``data``."""
    tagger = LoadedTagger(model, device)
    sentences = read_input(data)
    start = time.perf_counter()
    predicted = tagger.tag(sentences)
    seconds = time.perf_counter() - start
    gold = [s.tags(tagger.vocab.tagset) for s in sentences]
    tokens = sum(len(g) for g in gold)
    correct = sum(p == g for ps, gs in zip(predicted, gold) for p, g in zip(ps, gs))
    return {"accuracy": 100.0 * correct / tokens, "tokens": tokens, "sentences": len(sentences),
            "column": tag_column(tagger.vocab.tagset), "hidden": tagger.model.hidden_sizes,
            "tokens_per_second": speed(tokens, seconds)}


def evaluate_parser(model: str, data: str, device: str) -> dict[str, Any]:
    """UAS/LAS (both conventions) of a saved parser on the gold trees of the CoNLL-U file ``data``."""
    parser = LoadedParser(model, device)
    sentences = read_conllu(data, require_trees=True)
    if not sentences:
        raise ValueError(f"{data}: no sentences in the file")
    start = time.perf_counter()
    parses = parser.parse(sentences)
    seconds = time.perf_counter() - start
    return {**attachment_scores(sentences, parses).headline(), "sentences": len(sentences),
            "words": sum(len(s.words) for s in sentences), "hidden": parser.model.hidden_size,
            "sentences_per_second": speed(len(sentences), seconds)}

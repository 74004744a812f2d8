"""Applying a saved model to new text: ``mesimp-gpu parse`` (and scoring one on a file, for ``evaluate``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesimp_gpu.data.conllu import Sentence, read_conllu, rewrite_conllu
from mesimp_gpu.models.parser import Parser, load_parser
from mesimp_gpu.parsing.decode import parse_sentences
from mesimp_gpu.parsing.features import ParserVocab
from mesimp_gpu.parsing.scoring import attachment_scores
from mesimp_gpu.train.parse import EVAL_BATCH, scores_record
from mesimp_gpu.train.settings import resolve_device


@dataclass(frozen=True)
class ParseFileConfig:
    """Every setting of ``mesimp-gpu parse``; the CLI options mirror these fields."""

    model: str  # a run folder of `train parse` (or its model.json)
    input: str  # CoNLL-U file to parse (its FORM and tag columns are read; plain or gzip)
    output: str  # where the copy with predicted HEAD and DEPREL goes
    device: str = "cpu"  # cpu, cuda or cuda:N
    batch_size: int = EVAL_BATCH  # sentences parsed together

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if Path(self.input).resolve() == Path(self.output).resolve():
            raise ValueError(f"--output {self.output} is the input file; choose another path")


class LoadedParser:
    """A saved parser with its vocabularies, on a device, ready to parse sentences."""

    def __init__(self, model_path: str, device: str) -> None:
        self.device = resolve_device(device)
        self.model: Parser
        self.model, vocab_state = load_parser(model_path, self.device)
        self.vocab = ParserVocab.from_state_dict(vocab_state)

    def parse(self, sentences: list[Sentence], batch_size: int = EVAL_BATCH) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
        """``(heads, deprels)`` per sentence (greedy, legal transitions only: single-rooted trees)."""
        tags = [s.tags(self.vocab.tagset) for s in sentences]
        missing = next((s for s, t in zip(sentences, tags) if "_" in t), None)
        if missing is not None:
            raise ValueError(f"{missing.source}: the parser reads {self.vocab.tagset.value.upper()} tags, and this "
                             "sentence has none ('_'); tag the file first (mesimp-gpu tag)")
        return parse_sentences(sentences, self.vocab, lambda f: self.model(f.to(self.device)), batch_size)


def parse_file(config: ParseFileConfig) -> dict[str, Any]:
    """Parse ``config.input`` and write the copy with predicted HEAD and DEPREL; returns counts and speed."""
    parser = LoadedParser(config.model, config.device)
    sentences = read_conllu(config.input)
    if not sentences:
        raise ValueError(f"{config.input}: no sentences to parse")
    start = time.perf_counter()
    parses = parser.parse(sentences, config.batch_size)
    seconds = time.perf_counter() - start
    rewrite_conllu(config.input, config.output, (
        {"HEAD": [str(h) for h in heads], "DEPREL": list(deprels)} for heads, deprels in parses
    ))
    words = sum(len(s.words) for s in sentences)
    return {"sentences": len(sentences), "words": words, "seconds": seconds,
            "sentences_per_second": len(sentences) / seconds if seconds else float("inf")}


def evaluate_parser(model: str, data: str, device: str) -> dict[str, Any]:
    """UAS/LAS (both conventions) of a saved parser on the gold trees of the CoNLL-U file ``data``."""
    parser = LoadedParser(model, device)
    sentences = read_conllu(data, require_trees=True)
    if not sentences:
        raise ValueError(f"{data}: no sentences to score")
    start = time.perf_counter()
    parses = parser.parse(sentences)
    seconds = time.perf_counter() - start
    return {**scores_record(attachment_scores(sentences, parses)), "sentences": len(sentences),
            "words": sum(len(s.words) for s in sentences), "hidden": parser.model.hidden_size,
            "sentences_per_second": len(sentences) / seconds if seconds else float("inf")}

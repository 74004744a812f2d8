"""The ``tagger`` suite: the POS tagger trained dense, meProp and meSimp, then its tagging speed.

Training: ``train pos --preset competitive`` (a bidirectional meProp LSTM of ``tagger_hidden`` units per
direction over word, shape-feature and character-CNN vectors, dropout, Adam with learning-rate decay,
two dev evaluations per epoch) on the first ``tagger_limit`` training sentences of a treebank,
``tagger_epochs`` epochs per method, the methods taking turns epoch by epoch as in the MNIST train suite
(each run continued from its checkpoint). meProp and meSimp keep ``tagger_k`` gate-gradient entries per
gate, in both directions; meSimp prunes LSTM units in the first epoch and trains the pruned network
after it (cycles of one epoch). A row per method: the median epoch split into forward, backward and
update, the whole run, speedups over dense, training tokens per second, test accuracy at the best dev
score and the LSTM units kept.

Tagging (``mesimp-gpu tag``'s path: the saved model and vocabularies, batches of sentences sorted by
length): the dense tagger and the simplified one (the meSimp run's model at its best dev score, as
``train pos`` saves it) each tag the dev split used in training, timed side by side: one untimed pass
each, then ``tagger_decode_repeats`` rounds of one full pass each (rotated order); median tokens per
second with the 20th/80th percentiles. The dev accuracy of a timed pass is checked against the
trainer's record, so the timed model is the reported one. Only the LSTM shrinks: the embeddings, the
character CNN and the output layer cost the simplified tagger as much as the dense one.

The treebank: as the parse suite's (``ud_dir``, else ``MESIMP_UD_DIR``; tags are enough, no trees
needed). Without one the suite gives a single skipped row saying why.
"""

from __future__ import annotations

import tempfile
from functools import partial
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mesimp_gpu.backends import get_backend
from mesimp_gpu.bench.common import row
from mesimp_gpu.bench.config import BenchConfig, Provider, Suite
from mesimp_gpu.bench.parse import METHODS, SIMPLIFIED, Treebank, suite_treebank
from mesimp_gpu.bench.timing import Clock, time_passes
from mesimp_gpu.bench.train import add_speedups, epoch_fields, take_turns
from mesimp_gpu.train.inference import TAG_BATCH, LoadedTagger
from mesimp_gpu.train.pos import PosConfig, Preset, pos_config, train_pos
from mesimp_gpu.train.records import PHASES
from mesimp_gpu.train.settings import Method

#: largest accepted difference (percentage points) between the dev accuracy of a timed pass and the trainer's
#: record of the same model on the same sentences (the same computation in other batches: float rounding only)
TAG_TOLERANCE = 1e-6


def base_settings(config: BenchConfig, folder: str) -> PosConfig:
    """The ``train pos`` settings every run of the suite shares (method, epochs and out vary)."""
    return pos_config(Preset.COMPETITIVE, k=config.tagger_k, hidden=config.tagger_hidden, cycle=1,
                      device=config.device, data_dir=folder, limit=config.tagger_limit, seed=config.seed + 1,
                      progress=False)


def load_tagger_data(config: BenchConfig) -> Treebank | str:
    """The tagger suite's treebank (``tagger_limit`` applied), or why there is none and how to give one."""
    return suite_treebank(config, lambda folder: base_settings(config, folder), require_trees=False)


def run_tagger_suite(config: BenchConfig, device: torch.device, data: Treebank | str, clock: Clock,
                     log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train the tagger by each method, taking turns by epoch, then time the tagging of dev; the rows.

    ``data`` is :func:`load_tagger_data`'s answer: a string gives one skipped row with that reason.
    """
    if isinstance(data, str):
        return [row(Suite.TAGGER, Provider.DENSE, None, kind="skipped", label="tagger", status="skipped",
                    reason=data)]
    backend = get_backend("auto", device).name
    base = replace(base_settings(config, data.folder), backend=backend)
    sentences = len(data.splits["train"])
    with tempfile.TemporaryDirectory(prefix="mesimp-bench-tagger-") as tmp:

        def train_to(name: str, epoch: int) -> tuple[PosConfig, dict[str, Any]]:
            settings = replace(base, method=Method(name), epochs=epoch, out=str(Path(tmp) / name))
            k = "" if settings.method is Method.DENSE else f" (k={settings.k} per gate)"
            log(f"train pos {name}{k}: epoch {epoch}/{config.tagger_epochs} on {sentences} sentences of {data.name}")
            return settings, train_pos(settings, resume=epoch > 1, splits=data.splits)

        finished = take_turns([m.value for m in METHODS], config.tagger_epochs, train_to)
        rows = [train_row(settings, results, data, config.tagger_epochs) for settings, results in finished.values()]
        add_speedups(rows)
        trained = {name: (Path(settings.out), results) for name, (settings, results) in finished.items()}
        rows += tag_rows(config, clock, data, trained, log)
    return rows


def train_row(settings: PosConfig, results: dict[str, Any], data: Treebank, epochs: int) -> dict[str, Any]:
    """One method's row: per-epoch phase seconds, training tokens per second, accuracy, LSTM units kept."""
    method, counts, final = settings.method, results["data"], results["final"]
    timing = epoch_fields(results["epoch_seconds"])
    return row(
        Suite.TAGGER, Provider.DENSE if method is Method.DENSE else Provider.TOPK, settings.backend, kind="train",
        method=method.value, label=method.value, k=None if method is Method.DENSE else settings.k,
        selection=settings.selection.value, hidden=settings.hidden, bidirectional=settings.bidirectional,
        char_filters=settings.char_filters, batch=settings.batch_size, optimizer=settings.optimizer.value,
        lr=settings.lr, treebank=data.name, treebank_files={s: str(p) for s, p in data.paths.items()},
        sentences=counts["train"]["sentences"], tokens=counts["train"]["tokens"], epochs=epochs, **timing,
        tokens_per_s=counts["train"]["tokens"] / timing["median_s"], test_acc=final["test_acc_at_best_dev"],
        dev_acc=final["best_dev_acc"], sizes_at_best_dev=final["sizes_at_best_dev"], sizes=final["sizes"],
        test_acc_final_network=final["test_acc_final_network"], parameters_final=final["parameters_final"],
    )


def tag_rows(config: BenchConfig, clock: Clock, data: Treebank, trained: dict[str, tuple[Path, dict[str, Any]]],
             log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Tokens per second of the dense and the simplified tagger on dev, timed side by side; a row each."""
    dev = data.splits["dev"]
    names = [Method.DENSE.value, SIMPLIFIED.value]
    taggers = {name: LoadedTagger(str(trained[name][0]), config.device) for name in names}
    log(f"tagging: dense (LSTM {taggers['dense'].model.hidden_sizes}) and {SIMPLIFIED.value} "
        f"(LSTM {taggers[SIMPLIFIED.value].model.hidden_sizes}), {config.tagger_decode_repeats} passes over "
        f"{len(dev)} dev sentences each")
    stats, last = time_passes({name: partial(taggers[name].tag, dev, TAG_BATCH) for name in names},
                              config.tagger_decode_repeats, clock, config)
    tokens = sum(len(s.words) for s in dev)
    dense = stats[0]
    rows = []
    for name, s in zip(names, stats):
        tagger = taggers[name]
        gold = [x.tags(tagger.vocab.tagset) for x in dev]
        correct = sum(p == g for ps, gs in zip(last[name], gold) for p, g in zip(ps, gs))
        accuracy = 100.0 * correct / tokens
        error = abs(accuracy - trained[name][1]["final"]["best_dev_acc"])
        rows.append(row(
            Suite.TAGGER, Provider.DENSE if name == Method.DENSE.value else Provider.SIMPLIFIED, None, kind="tag",
            method=name, label=f"{name} tagger", hidden=tagger.model.hidden_sizes,
            parameters=sum(p.numel() for p in tagger.model.parameters()), treebank=data.name, split="dev",
            sentences=len(dev), tokens=tokens, batch=TAG_BATCH, status="ok", median_s=s.median, p20_s=s.p20,
            p80_s=s.p80, repeats=s.repeats, tokens_per_s=tokens / s.median, tokens_per_s_p20=tokens / s.p80,
            tokens_per_s_p80=tokens / s.p20, speedup=dense.median / s.median, dev_acc=accuracy, max_error=error,
            check_passed=error <= TAG_TOLERANCE,
        ))
    return rows


def tagger_section(rows: Sequence[dict[str, Any]], table: Callable[[Sequence[str], Sequence[Sequence[Any]]], str]) -> str:
    """The report's tagger section (``table``: the report's markdown table maker); empty without rows."""
    if not rows:
        return ""
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        return "\n".join(["## POS tagging", "", *[f"Skipped: {r['reason']}" for r in skipped]])
    train = [r for r in rows if r.get("kind") == "train"]
    tagged = [r for r in rows if r.get("kind") == "tag"]
    parts: list[str] = []

    def units(sizes: list[int] | None) -> str:
        return "-".join(map(str, sizes[1:-1])) if sizes else "-"

    if train:
        first = train[0]
        body = [[r["label"], r["k"] if r["k"] is not None else "-", *[f"{r['phases_s'][p]:.2f}" for p in PHASES],
                 f"{r['median_s']:.2f}", f"{r['speedup']:.2f}x", f"{r['run_s']:.1f}", f"{r['run_speedup']:.2f}x",
                 f"{r['backward_speedup']:.2f}x", f"{r['tokens_per_s']:.0f}", f"{r['test_acc']:.2f}",
                 f"{units(r['sizes_at_best_dev'])} ({units(r['sizes'])})"] for r in train]
        parts += [
            f"## POS tagging: BiLSTM tagger on {first['treebank']}, seconds per epoch by phase", "",
            f"{first['sentences']} training sentences ({first['tokens']} tokens), {first['epochs']} epoch(s), "
            f"{first['hidden']} LSTM units per direction, character CNN of {first['char_filters']}, batch "
            f"{first['batch']} sentences, {first['optimizer']} at lr {first['lr']:g}, backend {first['backend']}; k "
            f"per gate ({first['selection']}) in both directions; the median epoch, then the whole run; speedups "
            "over dense. Test accuracy at the best dev, of this short run; LSTM units per direction at the best dev "
            "(at the end).", "",
            table(["method", "k", *[f"{p} s" for p in PHASES], "epoch s", "epoch speedup", "run s", "run speedup",
                   "backward speedup", "train tokens/s", "test acc %", "LSTM units"], body)]
    if tagged:
        first = tagged[0]
        body = [[r["label"] + ("" if r["check_passed"] else " ✗"), "-".join(map(str, r["hidden"])),
                 f"{r['parameters']:,}",
                 f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_p20']:.0f}-{r['tokens_per_s_p80']:.0f})",
                 f"{r['speedup']:.2f}x", f"{r['dev_acc']:.2f}"] for r in tagged]
        if parts:
            parts.append("")
        parts += [
            f"### Tagging: tokens per second on {first['split']}", "",
            f"{first['sentences']} {first['split']} sentences ({first['tokens']} tokens), batches of {first['batch']} "
            f"sentences; the taggers take turns, one untimed pass each, then {first['repeats']} timed full passes "
            "each: median (p20-p80). The simplified tagger is the meSimp run's model at its best dev; only its LSTM "
            "is smaller. ✗ marks a timed pass whose dev accuracy differs from the trainer's record of that model.",
            "",
            table(["tagger", "LSTM units", "parameters", "tokens/s", "speedup over dense", "dev acc %"], body)]
    return "\n".join(parts)

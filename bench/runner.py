"""``mesimp-gpu bench``: run the chosen suites, write the results file, print and plot the report.

The results file (``bench-<device>[-quick]-<UTC time>.json`` in ``out_dir``) holds a header
(machine, versions, git commit, configuration, backends, calibration, notes) and one row per
measurement. It is rewritten atomically after each suite, with ``finished`` false until the end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from mesimp_gpu.backends import Backend, BackendUnavailable, load_backend
from mesimp_gpu.backends.cpu import CpuBackend
from mesimp_gpu.bench.calibrate import add_hardware_fractions, calibrate
from mesimp_gpu.bench.common import available_backends
from mesimp_gpu.bench.config import BenchConfig, Suite, all_cores
from mesimp_gpu.bench.distributed import run_distributed_suite
from mesimp_gpu.bench.layer import run_layer_suite
from mesimp_gpu.bench.parse import Treebank, load_treebank, run_parse_suite
from mesimp_gpu.bench.tagger import load_tagger_data, run_tagger_suite
from mesimp_gpu.bench.report import draw_plots, plot_links, render
from mesimp_gpu.bench.timing import clock_for
from mesimp_gpu.bench.topk import run_topk_suite
from mesimp_gpu.bench.train import run_train_suite
from mesimp_gpu.data.mnist import Mnist, load_mnist
from mesimp_gpu.io import write_json
from mesimp_gpu.machine import describe
from mesimp_gpu.train.records import jsonable
from mesimp_gpu.train.settings import resolve_device


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def results_path(config: BenchConfig, created: datetime) -> Path:
    """``out_dir/bench-<device>[-quick]-<YYYYmmdd-HHMMSS>.json`` (the device type, UTC time)."""
    kind = torch.device(config.device).type + ("-quick" if config.quick else "")
    return Path(config.out_dir) / f"bench-{kind}-{created:%Y%m%d-%H%M%S}.json"


def modified_files() -> list[str] | None:
    """Tracked files of the checkout that differ from its commit (the run used them), or None outside git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return [line[3:] for line in out.stdout.splitlines()] if out.returncode == 0 else None


def with_cpu_levels(backends: dict[str, Backend], skipped: dict[str, str],
                    levels: tuple[str, ...]) -> tuple[dict[str, Backend], dict[str, str]]:
    """``backends`` with the cpu backend replaced by one per instruction-set level (``cpu@<level>``, in the
    given order, right where ``cpu`` was); a level that cannot build or run here is skipped with the reason."""
    out: dict[str, Backend] = {}
    for name, backend in backends.items():
        if name != "cpu":
            out[name] = backend
            continue
        for level in levels:
            try:
                out[f"cpu@{level}"] = load_backend(f"cpu@{level}")
            except BackendUnavailable as exc:
                skipped = {**skipped, f"cpu@{level}": str(exc)}
    return out, skipped


def cpu_levels(backends: dict[str, Backend]) -> dict[str, dict[str, str]]:
    """Per cpu backend of the run: the level it was built for and what its build vectorises with."""
    return {name: {"arch": backend.arch, "simd": backend.ops.simd_info()}
            for name, backend in backends.items() if isinstance(backend, CpuBackend)}


def notes_for(config: BenchConfig, device: torch.device, treebank: Treebank | str | None = None) -> list[str]:
    """What a reader must know to read the numbers right (``treebank``: the parse suite's, or why there is none)."""
    notes = []
    if Suite.LAYER in config.suites or Suite.TOPK in config.suites:
        notes.append(f"inputs are fresh standard-normal tensors per shape; every provider is timed side by side with "
                     f"the others of its shape, {config.min_repeats}-{config.max_repeats} samples, median with p20/p80")
    if device.type == "cpu" and Suite.LAYER in config.suites:
        notes.append(f"layer shapes whose dense forward+backward exceeds {config.cpu_max_gflop:g} GFLOP are skipped "
                     "on CPU (a single call would take seconds)")
    if Suite.TRAIN in config.suites:
        images = "all 55,000" if config.train_limit is None else f"the first {config.train_limit}"
        notes.append(f"train suite: {images} MNIST training images, {config.train_epochs} epoch(s) per method, "
                     "methods taking turns by epoch; accuracies are those of this short run")
    if isinstance(treebank, str):
        notes.append(f"parse suite skipped: {treebank}")
    elif treebank is not None:
        sentences = len(treebank.splits["train"])
        which = f"all {sentences}" if config.parse_limit is None else f"the first {sentences}"
        notes.append(f"parse suite: {which} training sentences of {treebank.folder}, "
                     f"{config.parse_epochs} epoch(s) per method (dense, meProp and meSimp at k={config.parse_k}, "
                     f"{config.parse_hidden} hidden units), methods taking turns by epoch; scores are those of this "
                     f"short run; decoding: {len(treebank.splits['dev'])} dev sentences, the dense and the simplified "
                     f"parser alternating, {config.parse_decode_repeats} timed full passes each")
    if Suite.TAGGER in config.suites:
        which = "all" if config.tagger_limit is None else f"the first {config.tagger_limit}"
        notes.append(f"tagger suite: {which} training sentences, {config.tagger_epochs} epoch(s) per method (dense, "
                     f"meProp and meSimp at k={config.tagger_k} per gate, BiLSTM of {config.tagger_hidden} per "
                     "direction), methods taking turns by epoch; accuracies are those of this short run")
    load, cores = os.getloadavg()[0], all_cores()
    if device.type == "cpu" and config.thread_count > 1 and load > cores:
        notes.append(f"the machine was busy (load average {load:.1f} on {cores} cores): with {config.thread_count} "
                     "threads every parallel region can wait for a descheduled worker, which inflates the times of "
                     "small operations; --threads 1 avoids that")
    if device.type == "cpu" and config.cpu_clock == "process":
        notes.append(f"times are CPU seconds of this process (all {config.thread_count} thread(s) together), not wall "
                     "time: what it computed, without its waits for a core on a shared machine")
    if config.quick:
        notes.append("--quick preset: a reduced grid and few repeats; for a smoke test, not for reporting")
    return notes


def run_bench(config: BenchConfig, command: str = "mesimp-gpu bench", data: Mnist | None = None,
              log: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Run the suites of ``config``; returns the results file's path and its content.

    ``data`` replaces the MNIST files for the train suite (tests); ``log`` receives progress lines
    (default: stderr, so that stdout carries only the report).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    device = resolve_device(config.device)
    if (Suite.TRAIN in config.suites or Suite.DISTRIBUTED in config.suites) and data is None:
        data = load_mnist(config.data_dir)  # now: a missing data set should fail before minutes of timing
    treebank = load_treebank(config) if Suite.PARSE in config.suites else None  # a missing one skips the suite
    if isinstance(treebank, str):
        log(f"the parse suite will be skipped: {treebank}")
    tagger_data = load_tagger_data(config) if Suite.TAGGER in config.suites else None
    if isinstance(tagger_data, str):
        log(f"the tagger suite will be skipped: {tagger_data}")
    created = datetime.now(timezone.utc)
    path = results_path(config, created)
    with torch_threads(config.thread_count):
        backends, skipped = available_backends(device)
        if config.cpu_archs and device.type == "cpu":
            backends, skipped = with_cpu_levels(backends, skipped, config.cpu_archs)
        for name, reason in skipped.items():
            log(f"backend {name} skipped: {reason}")
        header: dict[str, Any] = {
            "created": created.isoformat(timespec="seconds"),
            "command": command,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "load_average_start": [round(v, 2) for v in os.getloadavg()],
            "machine": describe(device),
            "modified_files": modified_files(),  # uncommitted changes the run included, beyond git_commit
            "config": jsonable(config),
            "backends": list(backends),
            "cpu_levels": cpu_levels(backends),
            "skipped_backends": skipped,
            "notes": notes_for(config, device, treebank),
        }
        doc: dict[str, Any] = {"header": header, "rows": [], "finished": False}
        clock = clock_for(device, config.cpu_clock)
        if device.type == "cuda":
            log("calibrating the GPU")
            header["calibration"] = calibrate(config, device, clock)
        for suite in config.suites:
            if suite is Suite.LAYER:
                doc["rows"] += run_layer_suite(config, device, backends, clock, log)
            elif suite is Suite.TOPK:
                doc["rows"] += run_topk_suite(config, device, backends, clock, log)
            elif suite is Suite.TRAIN:
                doc["rows"] += run_train_suite(config, device, data, log)
            elif suite is Suite.DISTRIBUTED:
                doc["rows"] += run_distributed_suite(config, device, data, log)
            elif suite is Suite.TAGGER:
                doc["rows"] += run_tagger_suite(config, device, tagger_data, clock, log)
            else:
                doc["rows"] += run_parse_suite(config, device, treebank, clock, log)
            write_json(path, doc)
        if "calibration" in header:
            add_hardware_fractions(doc["rows"], header["calibration"])
        header["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        doc["finished"] = True
        write_json(path, doc)
    draw_plots(doc, path)
    return path, doc


def main(config: BenchConfig, command: str) -> None:
    """Run, then print the markdown report on stdout and where the files went on stderr."""
    path, doc = run_bench(config, command)
    print(render(doc, plot_links(doc, path)))
    print(f"results: {path}", file=sys.stderr)

"""Where a run writes: a folder of its own by default, and an explicit folder that already holds a run is
never overwritten by accident."""

from __future__ import annotations

import time
from pathlib import Path

#: a folder holding one of these holds a run
RUN_MARKERS = ("results.json", "checkpoint.pt")
#: what a run writes (results, checkpoints, models, plots), and the folder of its same-size baseline
RUN_PATTERNS = ("*.json", "*.pt", "*.png", ".*.tmp")
BASELINE_FOLDER = "same-size"
#: the sub-folder holding the model as it was at the end of the run (the run folder holds the best-dev one)
FINAL_MODEL_FOLDER = "final"
#: parent of the run folders made when no --out is given
RUNS_ROOT = Path("runs")


def new_run_folder(task: str, root: Path = RUNS_ROOT) -> Path:
    """A folder name under ``root`` that no run uses yet: ``<task>-<YYYYmmdd-HHMMSS>[-N]``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, number = root / f"{task}-{stamp}", 2
    while path.exists():
        path, number = root / f"{task}-{stamp}-{number}", number + 1
    return path


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds the results or the checkpoint of a run."""
    return any((folder / name).is_file() for name in RUN_MARKERS)


def clear_run(folder: Path) -> None:
    """Delete what a run wrote into ``folder`` (and its same-size baseline's and final model's folders);
    other files stay."""
    for pattern in RUN_PATTERNS:
        for path in folder.glob(pattern):
            if path.is_file():
                path.unlink()
    for name in (BASELINE_FOLDER, FINAL_MODEL_FOLDER):
        inner = folder / name
        if inner.is_dir():
            clear_run(inner)
            if not any(inner.iterdir()):
                inner.rmdir()


def prepare_run_folder(out: Path | None, task: str, resume: bool, overwrite: bool) -> Path:
    """The folder a run writes to: ``out``, or a new ``runs/<task>-<time>`` when None.

    Raises ValueError naming the options when ``--resume`` has no folder, when both ``--resume`` and
    ``--overwrite`` are given, or when ``out`` holds a run and neither is given. With ``overwrite`` the
    old run's files are deleted first, so no plot or model of it is left beside the new results.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if out is None:
        if resume:
            raise ValueError("--resume needs --out RUN_DIR, the folder of the run to continue")
        return new_run_folder(task)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    if holds_run(out) and not (resume or overwrite):
        raise ValueError(f"--out {out} already holds a run; continue it with --resume, replace it with --overwrite, "
                         "or choose another --out")
    if overwrite and out.is_dir():
        clear_run(out)
    return out

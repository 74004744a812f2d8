"""Finding and reading a treebank's train/dev/test CoNLL-U files, for the tagger and the parser.

A config names either a folder (``data_dir``, holding one ``*train``, ``*dev`` and ``*test.conllu[.gz]``
file, as UD releases are named) or the three files (``train_file``, ``dev_file``, ``test_file``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mesimp_gpu.data.conllu import Sentence, read_conllu

SPLITS = ("train", "dev", "test")


def check_treebank_settings(config: Any) -> None:
    """ValueError unless ``config`` names a data folder or all three files."""
    if config.data_dir is None and None in (config.train_file, config.dev_file, config.test_file):
        raise ValueError("no data: pass --data-dir (a folder with *train/*dev/*test.conllu[.gz]) "
                         "or all of --train-file, --dev-file and --test-file")


def find_treebank(config: Any) -> dict[str, Path]:
    """The train/dev/test file paths: explicit files first, else the one match per split in ``data_dir``."""
    explicit = {"train": config.train_file, "dev": config.dev_file, "test": config.test_file}
    paths: dict[str, Path] = {}
    for split in SPLITS:
        if explicit[split] is not None:
            paths[split] = Path(explicit[split])
            continue
        folder = Path(config.data_dir)
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


def load_splits(config: Any, require_trees: bool = False) -> tuple[dict[str, list[Sentence]], dict[str, Path]]:
    """Sentences per split (``config.limit`` applied: N train, max(N // 10, 100) dev and test) and their paths.

    An empty split is an error naming its file. ``require_trees`` checks every sentence's tree.
    """
    paths = find_treebank(config)
    small = None if config.limit is None else max(config.limit // 10, 100)
    limits = {"train": config.limit, "dev": small, "test": small}
    splits = {split: read_conllu(paths[split], limits[split], require_trees) for split in SPLITS}
    for split, sentences in splits.items():
        if not sentences:
            raise ValueError(f"{paths[split]}: the {split} file holds no sentences")
    return splits, paths


def given_or_loaded(
    config: Any, splits: dict[str, list[Sentence]] | None, require_trees: bool = False
) -> tuple[dict[str, list[Sentence]], dict[str, str]]:
    """``splits`` as given (sources ``<given>``), or read as ``config`` says -> (splits, source of each split)."""
    if splits is not None:
        return splits, dict.fromkeys(SPLITS, "<given>")
    loaded, paths = load_splits(config, require_trees)
    return loaded, {split: str(path) for split, path in paths.items()}

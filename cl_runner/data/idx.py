"""Reader for the IDX format of MNIST and Fashion-MNIST (plain or gzip-compressed)."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from cl_runner.errors import DataError

# IDX type codes -> numpy dtypes (big-endian where multi-byte).
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_bytes(path: Path) -> bytes:
    """The uncompressed bytes of ``path`` (a ``.gz`` file is decompressed)."""
    try:
        raw = path.read_bytes()
    except OSError as ex:
        raise DataError(f"cannot read data file {path}: {ex.strerror}.") from None
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as ex:
            raise DataError(f"data file {path} is corrupt (not a valid gzip stream: {ex}). "
                            f"Delete it and copy or download it again.") from None
    return raw


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array, checking the header against the payload size."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"data file {source} is corrupt: it does not start with an IDX header.")
    dtype = np.dtype(_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"data file {source} is corrupt: truncated IDX header.")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"data file {source} is corrupt: the header promises {shape} "
                        f"({expected} bytes) but the file holds {len(data)} bytes.")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.byteorder == ">" else arr


def load_idx(path: Path, sha256: str | None = None, size: int | None = None) -> np.ndarray:
    """Read an IDX file; the uncompressed bytes must match ``sha256`` when given (and, if
    ``size`` is given, when they are that many bytes long)."""
    data = read_bytes(path)
    if sha256 is not None and (size is None or len(data) == size):
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise DataError(f"data file {path} is corrupt: its SHA-256 is {digest[:12]}..., "
                            f"expected {sha256[:12]}.... Delete it and copy or download it again.")
    return parse_idx(data, str(path))


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` (uint8) in IDX format; used by tests and tools that make small datasets."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + arr.tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)

"""Reader and writer for the IDX format of MNIST and Fashion-MNIST.

An IDX file is two zero bytes, a type code byte, a byte with the number of dimensions,
one big-endian uint32 per dimension, then the data in big-endian order. Files may be
gzipped (detected by content, not by name).
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from automl_prune.errors import DataNotFoundError

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"

IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX type code -> NumPy dtype (big-endian)."""


def _bad(path: Path, problem: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"'{path}' is not a valid IDX file ({problem}); the file is truncated or corrupt. "
        "Download it again (or reinstall the dataset package) and retry."
    )


def read_idx_bytes(path: str | os.PathLike[str]) -> bytes:
    """The raw (decompressed) bytes of an IDX file, gzipped or not.

    Raises:
        DataNotFoundError: The file cannot be read or is a broken gzip stream.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataNotFoundError(
            f"cannot read '{path}': {exc.strerror or exc}; check the file and its permissions."
        ) from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise _bad(path, f"broken gzip data: {exc}") from exc
    return raw


def parse_idx(data: bytes, path: str | os.PathLike[str] = "<bytes>") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file.

    Args:
        data: File content.
        path: Name used in error messages.

    Returns:
        A writable array in native byte order with the file's shape.

    Raises:
        DataNotFoundError: Bad magic number, unknown type, or size not matching the header.
    """
    path = Path(path)
    if len(data) < 4:
        raise _bad(path, f"only {len(data)} bytes")
    zero, type_code, ndim = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or type_code not in IDX_TYPES or ndim == 0:
        raise _bad(path, f"bad magic number 0x{int.from_bytes(data[:4], 'big'):08x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _bad(path, "header cut short")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    dtype = IDX_TYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise _bad(path, f"{len(data)} bytes where the header {tuple(shape)} implies {expected}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    if dtype.byteorder == ">":
        return array.astype(dtype.newbyteorder("="))
    return array if array.flags.writeable else array.copy()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into a NumPy array.

    Raises:
        DataNotFoundError: The file is missing, unreadable, truncated or corrupt.
    """
    return parse_idx(read_idx_bytes(path), path)


def write_idx(path: str | os.PathLike[str], array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (used to make test fixtures and subsets).

    Args:
        path: Destination; gzipped when ``compress`` is True, or None and the name ends in ``.gz``.
        array: uint8, int8, int16, int32, float32 or float64 array with at least one dimension.
        compress: Force gzip on or off.

    Returns:
        The path written.
    """
    path = Path(path)
    codes = {dt.newbyteorder("=").str.lstrip("<>|="): code for code, dt in IDX_TYPES.items()}
    key = array.dtype.newbyteorder("=").str.lstrip("<>|=")
    if key not in codes or array.ndim == 0:
        raise ValueError(f"cannot write a {array.dtype} array of {array.ndim} dimensions as IDX")
    code = codes[key]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()
    content = header + body
    if compress if compress is not None else path.suffix == ".gz":
        content = gzip.compress(content, compresslevel=6)
    path.write_bytes(content)
    return path

"""Read the key/value metadata of a GGUF file without touching its tensors.

The header is small: magic, version, tensor count, KV count, then the KV pairs. Reading only
that lets a tokenizer be built from a multi-gigabyte model (or from llama.cpp's vocab-only test
files, which have no tensors at all) in milliseconds.

Output shape matches `mx.load(path, return_metadata=True)[1]` closely enough for
`tokenizer_from_gguf`: strings are `str`, arrays of strings are `list[str]`, numeric scalars
are Python `int`/`float`/`bool`, numeric arrays are numpy arrays.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

GGUF_MAGIC = b"GGUF"

# GGUF value types (ggml/include/gguf.h).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12

_SCALAR_FORMATS = {
    _UINT8: "<B",
    _INT8: "<b",
    _UINT16: "<H",
    _INT16: "<h",
    _UINT32: "<I",
    _INT32: "<i",
    _FLOAT32: "<f",
    _BOOL: "<?",
    _UINT64: "<Q",
    _INT64: "<q",
    _FLOAT64: "<d",
}
_NUMPY_DTYPES = {
    _UINT8: "<u1",
    _INT8: "<i1",
    _UINT16: "<u2",
    _INT16: "<i2",
    _UINT32: "<u4",
    _INT32: "<i4",
    _FLOAT32: "<f4",
    _BOOL: "?",
    _UINT64: "<u8",
    _INT64: "<i8",
    _FLOAT64: "<f8",
}


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands."""


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Return the KV metadata of the GGUF file at `path` (tensors are not read)."""
    with open(path, "rb") as f:
        return _read(f)


def _read(f: BinaryIO) -> dict[str, Any]:
    if f.read(4) != GGUF_MAGIC:
        raise GGUFError("not a GGUF file (bad magic)")
    (version,) = struct.unpack("<I", f.read(4))
    if version == 1:
        raise GGUFError("GGUF version 1 is not supported")
    _n_tensors, n_kv = struct.unpack("<QQ", f.read(16))
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _read_string(f)
        (value_type,) = struct.unpack("<I", f.read(4))
        metadata[key] = _read_value(f, value_type)
    return metadata


def _read_string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    # A few vocabularies carry tokens that are not valid UTF-8 on their own.
    return f.read(length).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, value_type: int) -> Any:
    if value_type == _STRING:
        return _read_string(f)
    if value_type == _ARRAY:
        elem_type, count = struct.unpack("<IQ", f.read(12))
        if elem_type == _STRING:
            return [_read_string(f) for _ in range(count)]
        if elem_type == _ARRAY:
            return [_read_value(f, _ARRAY) for _ in range(count)]
        dtype = np.dtype(_NUMPY_DTYPES[elem_type])
        return np.frombuffer(f.read(dtype.itemsize * count), dtype=dtype).copy()
    fmt = _SCALAR_FORMATS.get(value_type)
    if fmt is None:
        raise GGUFError(f"unknown GGUF value type {value_type}")
    (value,) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
    return value

"""A file format for nested plain data and arrays that runs no code when read.

What it stores: ``None``, bools, ints, floats (NaN and infinities too), strings, bytes, lists,
tuples, dicts (any of these as keys), NumPy arrays and scalars (every NumPy dtype, and the
``ml_dtypes`` ones such as bfloat16 that JAX uses) and PyTorch tensors (read back on the CPU, with
their dtype). Anything else is refused when writing, so a file never holds an object that would
need code to rebuild.

Layout::

    MAGIC                      16 bytes
    header length H            8 bytes, little-endian
    SHA-256 of the rest        32 bytes (header and data)
    header                     H bytes of JSON: {"meta": ..., "tree": ..., "arrays": [...]}
    data                       the arrays' bytes, each at a 64-byte aligned offset

Reading checks the magic, the checksum and every array's bounds before it builds anything, and
builds arrays with ``numpy.frombuffer``: a damaged file is a :class:`ArrayFileError` naming what is
wrong, never an exception from deep inside a decoder or silently different numbers.

The tree is JSON in which a plain JSON list is a list, and objects are tagged: ``{"t": [...]}`` a
tuple, ``{"d": [[key, value], ...]}`` a dict, ``{"a": i}`` array ``i`` of the array table,
``{"b": "<base64>"}`` bytes, ``{"f": "nan"}`` a non-finite float.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from typing import Any

import numpy as np

MAGIC = b"CLRUN-ARRAYS-v1\n"
_ALIGN = 64


class ArrayFileError(ValueError):
    """The bytes are not a readable array file (wrong magic, checksum mismatch, bad header)."""


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    return torch


def _np_dtype_name(dtype: np.dtype) -> str:
    """A name :func:`_np_dtype` turns back into ``dtype``: NumPy's own (``<f4``) or the
    ml_dtypes one (``bfloat16``), whose ``dtype.str`` would be an anonymous ``<V2``."""
    if dtype.kind == "V" or dtype.hasobject:
        if dtype.hasobject or dtype.fields is not None:
            raise TypeError(f"arrays of dtype {dtype} cannot be stored (objects or records)")
        return "ml_dtypes:" + dtype.name
    return dtype.str


def _np_dtype(name: str) -> np.dtype:
    if name.startswith("ml_dtypes:"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name.split(":", 1)[1]))
    dtype = np.dtype(name)
    if dtype.hasobject:
        raise ArrayFileError(f"array dtype {name!r} holds Python objects")
    return dtype


class _Writer:
    def __init__(self):
        self.arrays: list[dict] = []
        self.chunks: list[bytes] = []
        self.size = 0

    def _add(self, entry: dict, data: bytes) -> dict:
        pad = -self.size % _ALIGN
        if pad:
            self.chunks.append(b"\0" * pad)
            self.size += pad
        entry.update(offset=self.size, nbytes=len(data))
        self.chunks.append(data)
        self.size += len(data)
        self.arrays.append(entry)
        return {"a": len(self.arrays) - 1}

    def encode(self, obj: Any) -> Any:
        if isinstance(obj, (np.ndarray, np.number, np.bool_)):  # before float: np.float64 is one
            arr = np.asarray(obj)  # tobytes() below is in C order whatever the strides
            entry = {"kind": "numpy" if isinstance(obj, np.ndarray) else "numpy_scalar",
                     "dtype": _np_dtype_name(arr.dtype), "shape": list(arr.shape)}
            return self._add(entry, arr.tobytes())
        if obj is None or isinstance(obj, bool):
            return obj
        if isinstance(obj, str):
            return str(obj)
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj) if math.isfinite(obj) else {"f": repr(float(obj))}
        if isinstance(obj, bytes):
            return {"b": base64.b64encode(obj).decode("ascii")}
        torch = _torch()
        if torch is not None and isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu").contiguous()
            entry = {"kind": "torch", "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            flat = t.reshape(-1)
            try:
                data = flat.numpy().tobytes()
            except TypeError:  # bfloat16 and other dtypes NumPy lacks: their bytes as unsigned ints
                data = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                  8: torch.int64}[t.element_size()]).numpy().tobytes()
            return self._add(entry, data)
        if isinstance(obj, (list, tuple)):
            items = [self.encode(v) for v in obj]
            return items if isinstance(obj, list) else {"t": items}
        if isinstance(obj, dict):
            return {"d": [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
        raise TypeError(f"a value of type {type(obj).__module__}.{type(obj).__qualname__} cannot be stored "
                        f"(only plain data, NumPy arrays and torch tensors)")


def dumps(tree: Any, meta: dict | None = None) -> bytes:
    """``tree`` (and a JSON-able ``meta`` dict) as the bytes of an array file."""
    w = _Writer()
    encoded = w.encode(tree)
    header = json.dumps({"meta": meta or {}, "tree": encoded, "arrays": w.arrays},
                        separators=(",", ":"), allow_nan=False).encode("utf-8")
    body = header + b"".join(w.chunks)
    return MAGIC + struct.pack("<Q", len(header)) + hashlib.sha256(body).digest() + body


def read_meta(data: bytes) -> dict:
    """The ``meta`` dict of an array file, after checking its magic and checksum."""
    return _parse(data)[0]["meta"]


def _parse(data: bytes) -> tuple[dict, memoryview]:
    start = len(MAGIC) + 8 + 32
    if not data.startswith(MAGIC):
        raise ArrayFileError("not an array file (its first bytes are not the expected marker)")
    if len(data) < start:
        raise ArrayFileError(f"truncated ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[len(MAGIC):len(MAGIC) + 8])
    digest = data[len(MAGIC) + 8:start]
    body = memoryview(data)[start:]
    if hashlib.sha256(body).digest() != digest:
        raise ArrayFileError("checksum mismatch: the file was changed or damaged after it was written")
    if header_len > len(body):
        raise ArrayFileError("header length beyond the end of the file")
    try:
        header = json.loads(bytes(body[:header_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as ex:
        raise ArrayFileError(f"unreadable header ({ex})") from None
    if not isinstance(header, dict) or not {"meta", "tree", "arrays"} <= set(header):
        raise ArrayFileError("the header lacks meta, tree or arrays")
    return header, body[header_len:]


def loads(data: bytes) -> tuple[Any, dict]:
    """(tree, meta) of an array file's bytes; raises :class:`ArrayFileError` when they are not
    one or are damaged."""
    header, blob = _parse(data)
    arrays = header["arrays"]
    if not isinstance(arrays, list):
        raise ArrayFileError("the array table is not a list")
    built: dict[int, Any] = {}

    def array(i: Any) -> Any:
        if not isinstance(i, int) or not 0 <= i < len(arrays):
            raise ArrayFileError(f"reference to array {i!r} of {len(arrays)}")
        if i not in built:
            built[i] = _build(arrays[i], blob)
        return built[i]

    def decode(node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [decode(v) for v in node]
        if isinstance(node, dict) and len(node) == 1:
            (tag, value), = node.items()
            if tag == "t" and isinstance(value, list):
                return tuple(decode(v) for v in value)
            if tag == "d" and isinstance(value, list):
                out = {}
                for pair in value:
                    if not (isinstance(pair, list) and len(pair) == 2):
                        raise ArrayFileError("a dict entry is not a [key, value] pair")
                    key = decode(pair[0])
                    try:
                        out[key] = decode(pair[1])
                    except TypeError:
                        raise ArrayFileError(f"unhashable dict key {key!r}") from None
                return out
            if tag == "a":
                return array(value)
            if tag == "b" and isinstance(value, str):
                return base64.b64decode(value)
            if tag == "f" and value in ("nan", "inf", "-inf"):
                return float(value)
        raise ArrayFileError(f"unknown node {str(node)[:80]}")

    return decode(header["tree"]), header["meta"]


def _build(entry: Any, blob: memoryview) -> Any:
    try:
        kind, dtype_name, shape = entry["kind"], entry["dtype"], [int(n) for n in entry["shape"]]
        offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
    except (TypeError, KeyError, ValueError):
        raise ArrayFileError(f"bad array entry {str(entry)[:120]}") from None
    if offset < 0 or nbytes < 0 or offset + nbytes > len(blob) or any(n < 0 for n in shape):
        raise ArrayFileError(f"array bounds outside the file ({offset}+{nbytes} of {len(blob)})")
    count = math.prod(shape)
    raw = blob[offset:offset + nbytes]
    if kind == "torch":
        torch = _torch()
        if torch is None:  # pragma: no cover
            raise ArrayFileError("the file holds torch tensors and torch is not installed")
        dtype = getattr(torch, str(dtype_name), None)
        if not isinstance(dtype, torch.dtype):
            raise ArrayFileError(f"unknown torch dtype {dtype_name!r}")
        size = torch.empty((), dtype=dtype).element_size()
        if nbytes != count * size:
            raise ArrayFileError(f"a {dtype_name} tensor of shape {shape} needs {count * size} bytes, has {nbytes}")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return flat.view(dtype).reshape(shape).clone()
    if kind not in ("numpy", "numpy_scalar"):
        raise ArrayFileError(f"unknown array kind {kind!r}")
    try:
        dtype = _np_dtype(str(dtype_name))
    except ArrayFileError:
        raise
    except (TypeError, ValueError, AttributeError, ImportError):
        raise ArrayFileError(f"unknown dtype {dtype_name!r}") from None
    if nbytes != count * dtype.itemsize:
        raise ArrayFileError(f"an array {dtype_name} of shape {shape} needs {count * dtype.itemsize} bytes, "
                             f"has {nbytes}")
    arr = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()
    return arr[()] if kind == "numpy_scalar" else arr

"""A streaming safetensors writer: the header from shapes and dtypes first, then each array
(or each leading-axis chunk of one) written at its offset as it is produced.

The bytes are those of ``safetensors.numpy.save_file`` (tested): tensors laid out by dtype,
largest dtype first in the format's dtype order, then by name; the header is compact JSON in
that order (``__metadata__`` first when given, its keys sorted where save_file's order is
random), padded with spaces to a multiple of 8 bytes.
So memory is bounded by the largest array a caller produces, not by the file.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.lazy import is_lazy
from edgeq.streaming import RegionFile, row_ranges

# numpy dtype -> safetensors dtype, in the format's dtype order (the layout sorts descending)
_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
           "int32": "I32", "uint32": "U32", "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64"}
_RANK = {st: k for k, st in enumerate(_DTYPES.values())}


def _st_dtype(dtype) -> str:
    dt = np.dtype(dtype)
    if dt.name not in _DTYPES or dt.byteorder == ">":
        raise EdgeqError(f"safetensors: unsupported dtype {dt}")
    return _DTYPES[dt.name]


def layout(specs: Mapping[str, tuple[object, tuple[int, ...]]], metadata: Mapping[str, str] | None = None,
           align: int = 8) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(header bytes incl. the 8-byte length, name -> (file offset, length)) for arrays
    ``specs``: name -> (dtype, shape). ``align``: the header is space-padded so that the data
    section starts at a multiple of it (8: save_file's bytes; 64: every tensor whose offset in
    the data section is a multiple of 64 can be memory-mapped for kernels that need aligned data)."""
    if align % 8 or align <= 0:
        raise EdgeqError(f"safetensors: alignment must be a positive multiple of 8, got {align}")
    entries = []
    for name, (dtype, shape) in specs.items():
        st = _st_dtype(dtype)
        shape = [int(s) for s in shape]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        entries.append((name, st, shape, nbytes))
    entries.sort(key=lambda e: (-_RANK[e[1]], e[0].encode("utf-8")))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))  # save_file: hash order (random)
    pos = 0
    data_at: dict[str, tuple[int, int]] = {}
    for name, st, shape, nbytes in entries:
        header[name] = {"dtype": st, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        data_at[name] = (pos, nbytes)
        pos += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % align)
    head = struct.pack("<Q", len(text)) + text
    return head, {n: (len(head) + off, length) for n, (off, length) in data_at.items()}


class SafetensorsWriter:
    """Write a safetensors file whose arrays are declared up front and written in any order::

        with SafetensorsWriter(path, {"w": (np.float32, (4096, 4096))}) as st:
            for r0, r1 in row_ranges(4096, 4096):
                st.write("w", rows(r0, r1), start=r0)

    Closing checks that every array was written completely."""

    def __init__(self, path: str | Path, specs: Mapping[str, tuple[object, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None, align: int = 8):
        self.specs = {n: (np.dtype(dt), tuple(int(s) for s in shape)) for n, (dt, shape) in specs.items()}
        head, regions = layout(self.specs, metadata, align)
        size = len(head) + sum(length for _, length in regions.values())
        self._file = RegionFile(path, size, {"__header__": (0, len(head)), **regions})
        self._file.write("__header__", np.frombuffer(head, np.uint8))

    def write(self, name: str, array, start: int = 0) -> None:
        """Write ``array``: the whole tensor ``name``, or its entries ``[start, start + len(array))``
        along the first axis."""
        if name not in self.specs:
            raise EdgeqError(f"safetensors: {name!r} was not declared")
        dtype, shape = self.specs[name]
        a = np.asarray(array)
        if a.dtype != dtype or a.shape[1:] != shape[1:] or (a.ndim == 0) != (len(shape) == 0) \
                or (not shape and start) or (shape and start + a.shape[0] > shape[0]):
            raise EdgeqError(f"safetensors: {name}: got {a.dtype} {a.shape} at {start}, declared {dtype} {shape}")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._file.write(name, a, at=start * row)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return self._file.__exit__(exc_type, exc, tb)


def save_streaming(path: str | Path, specs: Mapping[str, tuple[object, tuple[int, ...]]], produce) -> None:
    """Write ``specs`` with ``produce(name)`` giving each array; for callers whose arrays are
    cheap one at a time (a lazy tensor is read in row chunks: memory is one chunk)."""
    with SafetensorsWriter(path, specs) as st:
        for name, (dtype, shape) in specs.items():
            a = produce(name)
            if is_lazy(a) and len(shape) >= 2:
                for r0, r1 in row_ranges(shape[0], int(np.prod(shape[1:], dtype=np.int64))):
                    st.write(name, np.asarray(a[r0:r1], dtype=dtype), start=r0)
            else:
                st.write(name, np.ascontiguousarray(a, dtype=dtype))

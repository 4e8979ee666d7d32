"""Check a GGUF file's metadata section against the file's size before gguf-py parses it.

gguf-py's ``GGUFReader`` walks an array value element by element, and reading past the end of the
file gives it empty arrays instead of an error: a metadata array claiming 2**32 numbers in a 5 kB
file loops 2**32 times (found by tools/fuzz_loaders.py). This walk computes every value's extent
(numeric arrays in one step, strings and nested arrays element by element, each at least 8 bytes)
and refuses the first one that ends past the end of the file, so the work is bounded by the
file's size.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

from edgeq.errors import EdgeqError

# GGUFValueType -> bytes per element for the fixed-size types (8 = STRING, 9 = ARRAY)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 32


class _Corrupt(Exception):
    pass


def check_metadata_extents(path: Path) -> None:
    """Raise a one-line EdgeqError if a metadata key or value of ``path`` claims more bytes
    than the file has (or has an unknown type); otherwise return (gguf-py parses the rest)."""
    if not path.is_file():
        return  # the caller reports it
    size = path.stat().st_size
    if size < 24:
        return  # gguf-py refuses it
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            return  # gguf-py refuses it
        (version,) = struct.unpack_from("<I", m, 4)
        bo = ">" if version & 0xFFFF == 0 else "<"  # gguf-py's byte-order rule
        (kv_count,) = struct.unpack_from(f"{bo}Q", m, 16)
        off, key = 24, None
        try:
            for _ in range(kv_count):
                off, raw = _string(m, off, size, bo)
                key = raw.decode("utf-8", errors="replace")
                off, (t,) = off + 4, _unpack(m, off, size, f"{bo}I")
                off = _value(m, off, t, size, bo, 0)
        except _Corrupt as exc:
            where = f"metadata {key!r}" if key is not None else "metadata key"
            raise EdgeqError(f"{path}: not a readable GGUF file (truncated or corrupt?): {where}: {exc}") from None


def _unpack(m, off: int, size: int, fmt: str) -> tuple:
    if off + struct.calcsize(fmt) > size:
        raise _Corrupt(f"ends past the end of the file ({size} bytes)")
    return struct.unpack_from(fmt, m, off)


def _string(m, off: int, size: int, bo: str) -> tuple[int, bytes]:
    (n,) = _unpack(m, off, size, f"{bo}Q")
    if n > size - off - 8:
        raise _Corrupt(f"a string of {n} bytes at offset {off} ends past the end of the file ({size} bytes)")
    return off + 8 + n, bytes(m[off + 8:off + 8 + n])


def _value(m, off: int, t: int, size: int, bo: str, depth: int) -> int:
    if t in _SCALAR:
        if off + _SCALAR[t] > size:
            raise _Corrupt(f"ends past the end of the file ({size} bytes)")
        return off + _SCALAR[t]
    if t == _STRING:
        return _string(m, off, size, bo)[0]
    if t != _ARRAY:
        raise _Corrupt(f"unknown value type {t}")
    if depth >= _MAX_NESTING:
        raise _Corrupt(f"arrays nested deeper than {_MAX_NESTING}")
    itype, n = _unpack(m, off, size, f"{bo}IQ")
    off += 12
    if itype in _SCALAR:
        if n > (size - off) // _SCALAR[itype]:
            raise _Corrupt(f"an array of {n} values of type {itype} ends past the end of the file ({size} bytes)")
        return off + n * _SCALAR[itype]
    if itype not in (_STRING, _ARRAY):
        raise _Corrupt(f"unknown array element type {itype}")
    if n > (size - off) // 8:  # every string or array element takes at least 8 bytes
        raise _Corrupt(f"an array of {n} elements ends past the end of the file ({size} bytes)")
    for _ in range(n):
        off = _value(m, off, itype, size, bo, depth + 1)
    return off

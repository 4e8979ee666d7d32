"""A strict, numpy-only safetensors reader (no torch, no pickle).

Written here rather than using ``safetensors.numpy`` so that bf16 tensors load (numpy has no
bfloat16) and so that truncated or corrupt files give one clear line instead of a panic.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 below
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | Path) -> tuple[dict, int]:
    """Return (header dict without __metadata__, data offset). Validates sizes."""
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise EdgeqError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise EdgeqError(f"{path}: corrupt or truncated safetensors header "
                             f"(header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise EdgeqError(f"{path}: corrupt safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise EdgeqError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) \
                or not _int_list(info.get("shape")) or not _int_list(info.get("data_offsets"), 2):
            raise EdgeqError(f"{path}: corrupt safetensors entry for {name!r} (expected dtype, shape "
                             "and data_offsets [start, end])")
        start, end = info["data_offsets"]
        dtype, shape = info["dtype"], info["shape"]
        if dtype not in _DTYPES:
            raise EdgeqError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        # Python integers: a claimed shape cannot overflow into a small, plausible byte count
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if end - start != nbytes or start < 0:
            raise EdgeqError(f"{path}: tensor {name!r}: expected {nbytes} bytes for shape {shape} "
                             f"{dtype}, header says {end - start}")
        if end > data_len:
            raise EdgeqError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                             f"{end} of the data section, which has only {data_len} bytes")
    return header, 8 + n


def _int_list(v, length: int | None = None) -> bool:
    """A JSON list of non-negative integers (of ``length`` items when given)."""
    return (isinstance(v, list) and (length is None or len(v) == length)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Load every tensor; floating tensors come back as float32, others as stored."""
    header, offset = read_header(path)
    out: dict[str, np.ndarray] = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name in sorted(header):
        out[name] = _read_tensor(mm, offset, header[name])
    del mm
    return out


def _read_tensor(mm: np.ndarray, offset: int, info: dict) -> np.ndarray:
    """One tensor of a memory-mapped file: floating ones as float32 (BF16 widened), others as stored."""
    start, end = info["data_offsets"]
    arr = np.asarray(mm[offset + start: offset + end]).view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    if info["dtype"] == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    return arr.copy()


def lazy_safetensors(path: str | Path) -> dict[str, "np.ndarray | LazyTensor"]:
    """Every tensor of a (validated) file without reading its data: floating tensors of two or
    more dimensions become :class:`~edgeq.lazy.LazyTensor` (float32 on use, read from the memory
    map), the rest (norms, biases, integer tensors) are read now exactly as :func:`read_safetensors`
    would return them."""
    from edgeq.lazy import LazyTensor

    header, offset = read_header(path)
    out: dict = {}
    small = []
    for name in sorted(header):
        info = header[name]
        if info["dtype"] in ("F32", "F16", "BF16", "F64") and len(info["shape"]) >= 2:
            out[name] = LazyTensor(path, offset + info["data_offsets"][0], info["dtype"], tuple(info["shape"]))
        else:
            small.append(name)
    if small:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        for name in small:
            out[name] = _read_tensor(mm, offset, header[name])
        del mm
    return out


def read_safetensors_aligned(path: str | Path, align: int = 64) -> dict[str, np.ndarray]:
    """Load every tensor as stored (no dtype conversion) into its own ``align``-byte aligned,
    writable buffer, read straight from the file (one copy, no transient second one) — for
    runtimes that hand the arrays to kernels zero-copy (DLPack needs aligned data)."""
    header, offset = read_header(path)
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name in sorted(header):
            info = header[name]
            start, end = info["data_offsets"]
            n = end - start
            raw = np.empty(n + align, np.uint8)
            pad = (-raw.ctypes.data) % align
            view = raw[pad:pad + n]
            f.seek(offset + start)
            if f.readinto(memoryview(view)) != n:
                raise EdgeqError(f"{path}: truncated safetensors file at tensor {name!r}")
            out[name] = view.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def map_safetensors(path: str | Path, copy_on_write: bool = False) -> dict[str, np.ndarray]:
    """Every tensor as stored (no dtype conversion; BF16 as uint16), as views of one memory map
    of the file: nothing is read until used, and the pages read are the page cache's
    (file-backed, dropped under memory pressure), not private memory — how runtimes hold an
    artifact's weights. The map lives as long as any view. Read-only views, or with
    ``copy_on_write`` writable ones (a private mapping: a page becomes private memory only if
    written; DLPack cannot export read-only arrays, so kernels get these)."""
    header, offset = read_header(path)
    out: dict[str, np.ndarray] = {}
    if not header:
        return out
    mm = np.memmap(path, dtype=np.uint8, mode="c" if copy_on_write else "r")
    for name in sorted(header):
        info = header[name]
        start, end = info["data_offsets"]
        out[name] = np.ndarray(tuple(info["shape"]), dtype=_DTYPES[info["dtype"]], buffer=mm,
                               offset=offset + start)
    return out


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a HF checkpoint directory (single file or indexed)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise EdgeqError(f"{index}: corrupt index ({exc.__class__.__name__})") from None
        files = sorted({model_dir / v for v in wm.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        files = [f for f in files if f.name != "adapter_model.safetensors"]
    if not files:
        if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
            raise EdgeqError(f"{model_dir}: only pickle checkpoints (*.bin/*.pt) found; edgeq loads "
                             "safetensors only (never unpickles untrusted files)")
        raise EdgeqError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        if not f.exists():
            raise EdgeqError(f"{model_dir}: index names missing shard {f.name}")
    return files

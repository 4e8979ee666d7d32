"""Spilling: where a layer-by-layer build parks what a pass produced, so memory holds a layer.

Inside ``with spilling(dir):`` every 2-D float32 array a pass produces through
:func:`spill` is written to a file in ``dir`` and replaced by a :class:`~edgeq.lazy.LazyTensor`
reading it back (memory-mapped, on use). Values are stored exactly (float32 bytes), so a
spilled build computes the same numbers as one held in memory. Statistics (float64) spill the
same way through :func:`spill_array` (float64: a :class:`~edgeq.lazy.LazyArray64` read whole on
use; other dtypes: a read-only memory map of a ``.npy`` file).
Outside such a block both functions return their argument.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeq.interrupts import make_temp_dir
from edgeq.lazy import LazyArray64, LazyTensor

# Arrays smaller than this stay in memory (norms, biases, tiny models' matrices cost less than a file).
MIN_SPILL_BYTES = 1 << 20

_active: list["SpillStore"] = []


class SpillStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.count = 0
        self.bytes = 0

    def _path(self, suffix: str) -> Path:
        self.count += 1
        return self.root / f"{self.count:06d}{suffix}"

    def put(self, arr: np.ndarray) -> LazyTensor:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        path = self._path(".f32")
        arr.tofile(path)
        self.bytes += arr.nbytes
        return LazyTensor(path, 0, "F32", arr.shape)

    def put_array(self, arr: np.ndarray):
        if arr.dtype != np.float64:
            path = self._path(".npy")
            np.save(path, arr)
            self.bytes += arr.nbytes
            return np.load(path, mmap_mode="r")
        arr = np.ascontiguousarray(arr)
        path = self._path(".f64")
        arr.tofile(path)
        self.bytes += arr.nbytes
        return LazyArray64(path, arr.shape)  # read on use, not kept mapped


def push_store(store: "SpillStore") -> None:
    """Make ``store`` the active store for the rest of this process (a worker process of a release
    matrix: its spilled files must outlive each task; the matrix removes the directory)."""
    _active.append(store)


def drop_store(store: "SpillStore") -> None:
    """Stop spilling into ``store`` (a long-lived worker moving on to another build's directory)."""
    if store in _active:
        _active.remove(store)


def active() -> "SpillStore | None":
    return _active[-1] if _active else None


def spill(arr):
    """``arr`` parked in the active store as a LazyTensor (float32 2-D arrays of at least
    MIN_SPILL_BYTES), else ``arr`` itself."""
    store = active()
    if store is None or not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype != np.float32 \
            or arr.nbytes < MIN_SPILL_BYTES:
        return arr
    return store.put(arr)


def spill_array(arr: np.ndarray) -> np.ndarray:
    """A float64 statistic parked in the active store (read back as a memory map), or ``arr``."""
    store = active()
    if store is None or not isinstance(arr, np.ndarray) or arr.nbytes < MIN_SPILL_BYTES:
        return arr
    return store.put_array(arr)


@contextlib.contextmanager
def spilling(parent: str | Path | None = None) -> Iterator[SpillStore]:
    """Spill into a fresh temporary directory under ``parent`` (default: the system temp dir),
    removed when the block ends (whatever the outcome)."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    root = make_temp_dir(".edgeq-spill.", parent)
    store = SpillStore(root)
    try:
        _active.append(store)
        yield store
    finally:
        if store in _active:
            _active.remove(store)
        shutil.rmtree(root, ignore_errors=True)


def free_disk_bytes(path: str | Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize

"""Lazy weights: a tensor that stays in its source file until a step reads it.

A :class:`LazyTensor` stands where the IR holds a float32 ``np.ndarray``: it reports the
logical ``shape`` / ``dtype`` (float32) / ``size`` and is materialised by numpy on use
(``np.asarray(t)``, arithmetic, ``t.astype``...). Row slices (``t[a:b]``) read only those rows
from the file, so a writer can stream a vocabulary-sized matrix in bounded memory.
Materialising never caches: a step that reads a tensor holds it only as long as it keeps the
returned array, which is what bounds a layer-by-layer build's memory by a layer, not by the model.

The source is a memory map (:func:`numpy.memmap` of the file, read-only); stored dtypes
float32, float16 and bfloat16 (numpy has no bf16: widened exactly through uint32) become float32.
"""
from __future__ import annotations

import operator
from pathlib import Path

import numpy as np

# stored dtype name -> (numpy storage dtype, bytes per element)
_STORED = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


def widen(raw: np.ndarray, stored: str) -> np.ndarray:
    """Stored values -> a new float32 array (bf16 widened exactly)."""
    if stored == "BF16":
        wide = raw.astype(np.uint32)
        wide <<= 16  # in place: one pass and one allocation fewer than ``<< 16``
        return wide.view(np.float32)
    return raw.astype(np.float32)


class LazyTensor:
    """A float32 tensor of ``shape`` stored at ``offset`` of ``path`` as ``stored`` (F32/F16/BF16/F64)."""

    __slots__ = ("path", "offset", "stored", "shape")

    def __init__(self, path: str | Path, offset: int, stored: str, shape: tuple[int, ...]):
        if stored not in _STORED:
            raise ValueError(f"LazyTensor: unsupported stored dtype {stored}")
        self.path, self.offset, self.stored, self.shape = str(path), int(offset), stored, tuple(int(s) for s in shape)

    # ---- array-like metadata (no I/O) ----------------------------------------------------
    dtype = np.dtype(np.float32)
    __array_priority__ = 20  # numpy binary ops hand the operation to our reflected operators

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * 4

    @property
    def stored_nbytes(self) -> int:
        return self.size * _STORED[self.stored].itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyTensor({Path(self.path).name}@{self.offset}, {self.stored}, shape={self.shape})"

    # ---- reading ---------------------------------------------------------------------------
    def _raw(self) -> np.ndarray:
        mm = np.memmap(self.path, dtype=_STORED[self.stored], mode="r", offset=self.offset, shape=self.shape)
        return mm

    def rows(self, start: int, stop: int) -> np.ndarray:
        """float32 copy of rows ``[start, stop)`` (reads only those bytes)."""
        return widen(self._raw()[start:stop], self.stored)

    def numpy(self) -> np.ndarray:
        return widen(self._raw(), self.stored)

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def __getitem__(self, key):
        first = key[0] if isinstance(key, tuple) and key else key
        if isinstance(first, slice) and first.step in (None, 1):
            start, stop, _ = first.indices(self.shape[0])
            part = self.rows(start, max(start, stop))
            return part[(slice(None),) + key[1:]] if isinstance(key, tuple) else part
        return self.numpy()[key]

    def astype(self, dtype, copy=True):
        return self.numpy().astype(dtype, copy=False)

    def __getattr__(self, name):  # anything else an ndarray has (reshape, T, sum, copy, ...)
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.numpy(), name)


def _forward(op):
    def f(self, *args):
        return op(self.numpy(), *args)
    return f


def _reflect(op):
    def f(self, other):
        return op(other, self.numpy())
    return f


for _name, _op in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("matmul", operator.matmul), ("pow", operator.pow),
                   ("floordiv", operator.floordiv), ("mod", operator.mod)):
    setattr(LazyTensor, f"__{_name}__", _forward(_op))
    setattr(LazyTensor, f"__r{_name}__", _reflect(_op))
for _name, _op in (("neg", operator.neg), ("abs", operator.abs), ("pos", operator.pos),
                   ("lt", operator.lt), ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge)):
    setattr(LazyTensor, f"__{_name}__", _forward(_op))


def materialize(x) -> np.ndarray:
    """The array itself, whether ``x`` is lazy or already an array (no copy for arrays)."""
    return x.numpy() if isinstance(x, LazyTensor) else x


def is_lazy(x) -> bool:
    return isinstance(x, LazyTensor)


class LazyArray64(LazyTensor):
    """A float64 array parked in a raw file (edgeq.spill statistics): read whole on use, as float64,
    and unmapped again, so a build's resident memory does not grow with every layer's statistics."""

    __slots__ = ()
    dtype = np.dtype(np.float64)

    def __init__(self, path: str | Path, shape: tuple[int, ...]):
        super().__init__(path, 0, "F64", shape)

    @property
    def nbytes(self) -> int:
        return self.size * 8

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.array(self._raw()[start:stop])

    def numpy(self) -> np.ndarray:
        return np.array(self._raw())

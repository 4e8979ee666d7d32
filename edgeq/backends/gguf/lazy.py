"""Lazy GGUF weights: a tensor of a GGUF file, dequantized to float32 only when a step reads it.

:class:`GGUFTensor` is an :class:`edgeq.lazy.LazyTensor` (so ``is_lazy``, ``materialize``,
``np.asarray``, row slices and the streaming writers treat it like a safetensors weight) that
records the file, the data offset, the ggml type and the shape. GGML blocks run along a row,
so rows ``[a, b)`` are one contiguous byte range: a row slice reads and decodes only those
bytes. Nothing is cached.

Q/K weights of a llama-layout GGUF are stored with each head's rows interleaved (llama.cpp's
permutation); with ``n_head`` set the tensor reads the heads a row range touches and restores
HF's rotate-half order (:func:`~edgeq.backends.gguf.layout.interleaved_to_rotate_half`) before
slicing, so every row range gets the same values as permuting the whole matrix.

Decoding is the one the eager reader used: F32 as stored, edgeq's reference dequantizer for
its own types (:class:`~edgeq.quant.formats.QType`), ``gguf.quants.dequantize`` for the other
ggml types; ggml blocks are decoded independently, so a row range decodes to exactly the
values of the whole tensor's rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.backends.gguf.layout import gguf_module, interleaved_to_rotate_half
from edgeq.lazy import LazyTensor
from edgeq.quant.formats import QType
from edgeq.quant.reference import dequantize


def block_shape(ggml_type: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type name."""
    gguf = gguf_module()
    return tuple(int(v) for v in gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]])


_decodable: dict[str, bool] = {}


def can_dequantize(ggml_type: str) -> bool:
    """Whether tensors of this ggml type decode to float32 (decided by decoding one zero block)."""
    if ggml_type not in _decodable:
        if ggml_type == "F32" or ggml_type in QType.__members__:
            _decodable[ggml_type] = True
        else:
            n, size = block_shape(ggml_type)
            try:
                decode(np.zeros(size, np.uint8), ggml_type, (n,))
                _decodable[ggml_type] = True
            except (NotImplementedError, KeyError):
                _decodable[ggml_type] = False
    return _decodable[ggml_type]


def decode(raw: np.ndarray, ggml_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """GGML bytes ``raw`` (uint8, exactly the bytes of ``shape``) -> a new float32 array of ``shape``."""
    if ggml_type == "F32":
        return np.array(raw.view("<f4"), dtype=np.float32).reshape(shape)
    if ggml_type in QType.__members__:
        return np.asarray(dequantize(raw, QType(ggml_type), shape), dtype=np.float32)
    gguf = gguf_module()
    n, size = block_shape(ggml_type)
    out = gguf.quants.dequantize(raw.reshape(-1, shape[-1] // n * size), gguf.GGMLQuantizationType[ggml_type])
    return np.asarray(out, dtype=np.float32).reshape(shape)


class GGUFTensor(LazyTensor):
    """A float32 tensor of ``shape`` (numpy order: rows first) stored at byte ``offset`` of the
    GGUF file ``path`` as ggml type ``stored`` (F32, F16, Q8_0, Q4_K, ...); ``n_head`` > 0 for a
    Q/K weight stored in llama.cpp's interleaved order."""

    __slots__ = ("n_head", "row_bytes")

    def __init__(self, path: str | Path, offset: int, stored: str, shape: tuple[int, ...], n_head: int = 0):
        self.path, self.offset, self.stored = str(path), int(offset), stored
        self.shape = tuple(int(s) for s in shape)
        self.n_head = int(n_head)
        n, size = block_shape(stored)
        per_row = int(np.prod(self.shape[1:], dtype=np.int64))
        if not self.shape or per_row % n or (self.shape[-1] % n):
            raise ValueError(f"GGUFTensor: shape {self.shape} is not whole {stored} blocks of {n}")
        self.row_bytes = per_row // n * size
        if self.n_head and (self.shape[0] % self.n_head or (self.shape[0] // self.n_head) % 2):
            raise ValueError(f"GGUFTensor: {self.shape[0]} rows are not {self.n_head} heads of even size")

    @property
    def stored_nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __repr__(self) -> str:
        perm = f", n_head={self.n_head}" if self.n_head else ""
        return f"GGUFTensor({Path(self.path).name}@{self.offset}, {self.stored}, shape={self.shape}{perm})"

    def _decode(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as stored in the file (no permutation), decoded."""
        shape = (stop - start,) + self.shape[1:]
        if stop <= start:
            return np.empty(shape, np.float32)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset + start * self.row_bytes,
                        shape=((stop - start) * self.row_bytes,))
        try:
            return decode(np.asarray(raw), self.stored, shape)
        finally:
            del raw

    def rows(self, start: int, stop: int) -> np.ndarray:
        """float32 rows ``[start, stop)`` (clamped like a slice); reads only those rows' bytes
        (for a permuted Q/K weight: the heads those rows fall in)."""
        n = self.shape[0]
        start = min(max(int(start), 0), n)
        stop = min(max(int(stop), start), n)
        if not self.n_head or stop == start:
            return self._decode(start, stop)
        hd = n // self.n_head
        h0, h1 = start // hd, -(-stop // hd)
        heads = interleaved_to_rotate_half(self._decode(h0 * hd, h1 * hd), h1 - h0)
        if (start, stop) == (h0 * hd, h1 * hd):
            return heads
        return heads[start - h0 * hd:stop - h0 * hd].copy()

    def numpy(self) -> np.ndarray:
        return self.rows(0, self.shape[0])

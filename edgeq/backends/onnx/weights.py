"""Weight sources of the ONNX writer: a weight read on demand by row ranges, and the
``(initializer, byte offset, array)`` pieces it is written as (quantized, transposed, as is),
one row chunk at a time."""
from __future__ import annotations

import numpy as np

from edgeq.quant.intgroup import rtn_int
from edgeq.streaming import ordered_map, row_ranges


class Rows:
    """A float32 (N, K) weight read on demand: row ranges of IR tensors (lazy or in memory)
    stacked, optionally restricted to input columns ``[lo, hi)``. Nothing is read until
    :meth:`read`, which reads only the rows asked for."""

    def __init__(self, parts, cols: tuple[int, int] | None = None):
        self.parts = [(t, int(lo), int(hi)) for t, lo, hi in parts]  # (tensor, first row, end row)
        self.cols = cols
        k = self.parts[0][0].shape[1]
        self.shape = (sum(hi - lo for _, lo, hi in self.parts), k if cols is None else cols[1] - cols[0])

    @classmethod
    def of(cls, t, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> "Rows":
        lo, hi = rows or (0, t.shape[0])
        return cls([(t, lo, hi)], cols)

    def read(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        r1 = self.shape[0] if r1 is None else r1
        out, at = [], 0
        for t, lo, hi in self.parts:
            a, b = max(r0, at), min(r1, at + hi - lo)
            if a < b:
                part = t[lo + a - at:lo + b - at]
                out.append(part if self.cols is None else part[:, self.cols[0]:self.cols[1]])
            at += hi - lo
        return np.ascontiguousarray(out[0] if len(out) == 1 else np.concatenate(out), dtype=np.float32)


def quantized_pieces(rows: Rows, fmt, names: dict[str, str]):
    """``(name, byte offset, array)`` pieces of a weight's MatMulNBits initializers (``names``:
    B / scales / zero_points -> initializer), quantized one row chunk at a time (group-wise
    quantization is per row, so the pieces are exactly those of the whole weight), a few chunks
    in flight on worker threads."""
    n, k = rows.shape

    def chunk(r):
        r0, r1 = r
        t = rtn_int(rows.read(r0, r1), fmt)
        mnb = t.to_matmulnbits()
        mnb["scales"] = mnb["scales"].reshape(r1 - r0, t.n_blocks)
        return r0, r1, mnb

    for r0, r1, mnb in ordered_map(chunk, row_ranges(n, k)):  # chunks quantized on every core
        for key, name in names.items():
            a = mnb[key]
            yield name, r0 * (a.nbytes // (r1 - r0)), a


def transposed_pieces(rows: Rows, name: str):
    """The float32 weight transposed to (in, out), in row chunks of the transpose (the weight
    itself is read whole: one tensor)."""
    w = rows.read()
    n, k = w.shape
    for c0, c1 in row_ranges(k, n):
        yield name, c0 * n * 4, np.ascontiguousarray(w[:, c0:c1].T)


def row_pieces(rows: Rows, name: str):
    n, k = rows.shape
    for r0, r1 in row_ranges(n, k):
        yield name, r0 * k * 4, rows.read(r0, r1)



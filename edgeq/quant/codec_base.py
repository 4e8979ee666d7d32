"""The block codec interface (:class:`Codec`) and a block's parameters (:class:`Params`); the
codecs themselves are in codecs_legacy.py / codecs_kquant.py, the registry in codecs.py."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.quant.formats import QType

_F32 = np.float32


@dataclass(frozen=True, eq=False)
class Params:
    """Parameters of ``R`` blocks (every array has leading dimension ``R``).

    * ``d``: (R,) float32 scale (an fp16 value): Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 ``d``, Q4_K/Q6_K
      super-block ``d``, int-group scale.
    * ``m``: (R,) float32 (fp16 value): Q4_1/Q5_1 ``m`` (added), Q4_K ``dmin``.
    * ``sc``: Q4_K (R, 8) uint8 6-bit sub-block scales; Q6_K (R, 16) int8 sub-block scales.
    * ``mn``: Q4_K (R, 8) uint8 6-bit sub-block mins.
    * ``zp``: int-group asymmetric zero points, (R,) uint8 codes.
    """

    d: np.ndarray
    m: np.ndarray | None = None
    sc: np.ndarray | None = None
    mn: np.ndarray | None = None
    zp: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.d)

    def take(self, rows) -> "Params":
        """The parameters of a subset of the rows (any numpy index along the first axis)."""
        def t(a):
            return None if a is None else a[rows]
        return Params(t(self.d), t(self.m), t(self.sc), t(self.mn), t(self.zp))


class Codec:
    """Block codec for one quantized format (get instances with :func:`codec_for`)."""

    qtype: QType | None = None
    block: int = 32
    type_size: int = 0
    qmin: int = 0  # code range, inclusive
    qmax: int = 15
    zero_code: int = 0  # code used where every code decodes to the same value (scale 0)
    store_min: int | None = None  # lowest code the block format can hold, when below qmin

    # ------------------------------------------------------------------ interface
    def fit(self, x: np.ndarray, weight: np.ndarray | None = None) -> Params:
        raise NotImplementedError

    def decode(self, p: Params, q: np.ndarray, cols: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def pack(self, p: Params, q: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def unpack(self, data: np.ndarray) -> tuple[Params, np.ndarray]:
        raise NotImplementedError

    def _affine(self, p: Params, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(A, B), broadcastable to (R, n) float64, with value ~= A * q + B."""
        raise NotImplementedError

    def encode(self, p: Params, x: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Nearest representable codes (R, n) int16 for values ``x`` (R, n) at in-block ``cols``.

        "Nearest" is measured on ``decode``'s float32 values; on an exact tie the lower code wins.
        The candidates are the four codes around ``(x - B) / A``, which always contain the
        nearest one unless a block's float32 rounding of the offset exceeds a whole step.
        """
        x = np.asarray(x, _F32)
        cols = self._cols(cols)
        if x.ndim != 2 or x.shape != (len(p), cols.size):
            raise EdgeqError(f"expected x of shape ({len(p)}, {cols.size}), got {x.shape}")
        a, b = self._affine(p, cols)
        a = np.broadcast_to(a, x.shape)
        x64 = x.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            t = (x64 - b) / a
        flat = (a == 0) | ~np.isfinite(t)
        f = np.floor(np.clip(np.where(flat, self.zero_code, t), self.qmin - 2, self.qmax + 2))
        best_q = best_e = None
        for k in (-1, 0, 1, 2):
            c = np.clip(f + k, self.qmin, self.qmax).astype(np.int16)
            e = np.abs(self.decode(p, c, cols).astype(np.float64) - x64)
            if best_q is None:
                best_q, best_e = c, e
            else:
                better = e < best_e
                best_q = np.where(better, c, best_q)
                best_e = np.where(better, e, best_e)
        return np.where(flat, np.int16(self.zero_code), best_q).astype(np.int16)

    def rtn(self, x: np.ndarray, weight: np.ndarray | None = None) -> tuple[Params, np.ndarray]:
        """Round-to-nearest quantization of whole blocks ``x`` (R, block): (params, codes)."""
        x = self._blocks(x)
        p = self.fit(x, weight)
        return p, self.encode(p, x, np.arange(self.block))

    # ------------------------------------------------------------------ helpers
    def _blocks(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, _F32)
        if x.ndim != 2 or x.shape[1] != self.block:
            raise EdgeqError(f"{self.name}: expected blocks of shape (R, {self.block}), got {x.shape}")
        return x

    def _cols(self, cols) -> np.ndarray:
        cols = np.asarray(cols, np.intp).reshape(-1)
        if cols.size and (cols.min() < 0 or cols.max() >= self.block):
            raise EdgeqError(f"{self.name}: expected in-block columns in [0, {self.block}), got {cols}")
        return cols

    def _check_codes(self, q: np.ndarray, n: int) -> np.ndarray:
        q = np.asarray(q)
        if q.ndim != 2 or q.shape != (n, self.block):
            raise EdgeqError(f"{self.name}: expected codes of shape ({n}, {self.block}), got {q.shape}")
        lo = self.qmin if self.store_min is None else self.store_min
        if q.size and (q.min() < lo or q.max() > self.qmax):
            raise EdgeqError(f"{self.name}: codes outside [{lo}, {self.qmax}]")
        return q

    def _data(self, data: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(data)
        if data.dtype != np.uint8:
            data = data.view(np.uint8)
        if data.size % self.type_size:
            raise EdgeqError(f"{self.name}: expected a multiple of {self.type_size} bytes, got {data.size}")
        return data.reshape(-1, self.type_size)

    @property
    def name(self) -> str:
        return self.qtype.value if self.qtype is not None else type(self).__name__

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


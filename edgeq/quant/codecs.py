"""Block codecs: choose, encode, decode and pack one quantization block at a time.

A codec splits quantization into the steps a GPTQ-style quantizer needs when it walks a weight
matrix column by column:

* ``fit(x, weight)`` picks a block's parameters (scales / mins) for ``R`` rows at once, already
  rounded to their storage precision (fp16 values kept as float32, 6- or 8-bit integers);
* ``encode(p, x, cols)`` returns the nearest representable integer codes for values sitting at
  in-block columns ``cols`` (GPTQ encodes one column, then spreads its error to later columns);
* ``decode(p, q, cols)`` gives the float32 values exactly as ggml's ``dequantize_row_*`` computes
  them (same float32 operation order);
* ``pack(p, q)`` / ``unpack(data)`` convert to and from the GGML block bytes.

Codes ``q`` are the integers stored in the block (int16 arrays): Q8_0 ``[-127, 127]`` (the
symmetric int8 range ggml's own quantizer uses), Q4_0 / Q4_1 / Q4_K ``[0, 15]``, Q5_0 / Q5_1
``[0, 31]``, Q6_K ``[0, 63]``.  Values:

* Q8_0: ``q * d``; Q4_0: ``(q - 8) * d``; Q5_0: ``(q - 16) * d``; Q4_1 / Q5_1: ``q * d + m``.
* Q4_K (super-block of 256 = 8 sub-blocks of 32): ``d1 * q - m1`` with ``d1 = d * sc[j]``,
  ``m1 = dmin * mn[j]``; ``d``, ``dmin`` fp16, ``sc``, ``mn`` 6-bit unsigned.
* Q6_K (super-block of 256 = 16 sub-blocks of 16): ``(d * sc[j]) * (q - 32)``; ``sc`` int8.

Fits.  The 32-value ("legacy") types follow ggml's round-to-nearest rule (``weight`` is
ignored), and :meth:`Codec.rtn` reproduces ggml's codes exactly (they are computed with the fp32
reciprocal of the unrounded scale, so they can differ from ``encode``'s nearest code by one step
now and then).  The K-quant fits are our own, *not* ggml's ``make_qkx2_quants`` /
``make_qx_quants``: per sub-block they try a handful of candidate scales, refit scale (and min)
by weighted least squares for the codes each candidate gives, keep the one with the least
weighted squared error, then round the sub-block scales to 6 / 8 bits against fp16 super-block
scales.  Their bytes are valid GGML blocks (any reader decodes them exactly as ``decode`` does)
but differ from what llama.cpp would write.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.quant.blockops import (
    f16,
    f16_bytes,
    f16_finite,
    f16_from,
    first_absmax,
    importance_weights,
    pack_nibbles,
    pack_qh,
    recip,
    roundf,
    unpack_nibbles,
    unpack_qh,
)
from edgeq.quant.formats import FORMATS, QType, as_qtype, row_nbytes

_F32 = np.float32

# Blocks per step in rtn_encode: bounds the K-quant fits' temporaries to a few tens of MB.
_CHUNK_ELEMS = 1 << 19


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


# ---------------------------------------------------------------------------- legacy (32)


class _Q8_0(Codec):
    qtype, block, type_size, qmin, qmax, zero_code = QType.Q8_0, 32, 34, -127, 127, 0
    store_min = -128  # int8 can hold it (ggml never writes it; unpack may meet it)

    def _d32(self, x):
        return np.abs(x).max(axis=1) / _F32(127)

    def fit(self, x, weight=None):
        return Params(d=f16(self._d32(self._blocks(x))))

    def rtn(self, x, weight=None):
        x = self._blocks(x)
        d = self._d32(x)
        with np.errstate(over="ignore", invalid="ignore"):
            q = roundf(x * recip(d)[:, None]).astype(np.int16)
        return Params(d=f16(d)), q

    def decode(self, p, q, cols):
        return np.asarray(q).astype(_F32) * p.d[:, None]

    def _affine(self, p, cols):
        return p.d.astype(np.float64)[:, None], 0.0

    def pack(self, p, q):
        q = self._check_codes(q, len(p))
        return np.concatenate([f16_bytes(p.d), q.astype(np.int8).view(np.uint8)], axis=1)

    def unpack(self, data):
        b = self._data(data)
        return Params(d=f16_from(b[:, :2])), b[:, 2:].view(np.int8).astype(np.int16)


class _SymLegacy(Codec):
    """Q4_0 / Q5_0: value = (q - half) * d; ggml: d = max / -half, q = min(qmax, (int)(x*id + half + .5))."""

    def __init__(self, qtype: QType, bits: int):
        self.qtype, self.block, self.type_size = qtype, 32, FORMATS[qtype].type_size
        self.bits, self.half = bits, 1 << (bits - 1)
        self.qmin, self.qmax, self.zero_code = 0, (1 << bits) - 1, self.half

    def _d32(self, x):
        return first_absmax(x) / _F32(-self.half)

    def fit(self, x, weight=None):
        return Params(d=f16(self._d32(self._blocks(x))))

    def rtn(self, x, weight=None):
        x = self._blocks(x)
        d = self._d32(x)
        with np.errstate(over="ignore", invalid="ignore"):
            v = x * recip(d)[:, None] + _F32(self.half + 0.5)
            q = np.minimum(np.trunc(v), _F32(self.qmax)).astype(np.int16)
        return Params(d=f16(d)), q

    def decode(self, p, q, cols):
        return (np.asarray(q).astype(np.int16) - np.int16(self.half)).astype(_F32) * p.d[:, None]

    def _affine(self, p, cols):
        d = p.d.astype(np.float64)[:, None]
        return d, -self.half * d

    def pack(self, p, q):
        q = self._check_codes(q, len(p)).astype(np.uint8)
        parts = [f16_bytes(p.d)]
        if self.bits == 5:
            parts.append(pack_qh(q))
        parts.append(pack_nibbles(q & np.uint8(0x0F)))
        return np.concatenate(parts, axis=1)

    def unpack(self, data):
        b = self._data(data)
        if self.bits == 5:
            q = unpack_nibbles(b[:, 6:]) | unpack_qh(b[:, 2:6])
        else:
            q = unpack_nibbles(b[:, 2:])
        return Params(d=f16_from(b[:, :2])), q.astype(np.int16)


class _MinLegacy(Codec):
    """Q4_1 / Q5_1: value = q * d + m; ggml: d = (max - min) / qmax, q = (int)((x - min)*id + .5)."""

    def __init__(self, qtype: QType, bits: int):
        self.qtype, self.block, self.type_size = qtype, 32, FORMATS[qtype].type_size
        self.bits = bits
        self.qmin, self.qmax, self.zero_code = 0, (1 << bits) - 1, 0

    def _dm32(self, x):
        rows = np.arange(x.shape[0])
        mn = x[rows, x.argmin(axis=1)]  # first occurrence decides the sign of a zero
        mx = x[rows, x.argmax(axis=1)]
        return (mx - mn) / _F32(self.qmax), mn

    def fit(self, x, weight=None):
        d, mn = self._dm32(self._blocks(x))
        return Params(d=f16(d), m=f16(mn))

    def rtn(self, x, weight=None):
        x = self._blocks(x)
        d, mn = self._dm32(x)
        with np.errstate(over="ignore", invalid="ignore"):
            v = (x - mn[:, None]) * recip(d)[:, None] + _F32(0.5)
            q = np.minimum(np.trunc(v), _F32(self.qmax)).astype(np.int16)
        return Params(d=f16(d), m=f16(mn)), q

    def decode(self, p, q, cols):
        return np.asarray(q).astype(_F32) * p.d[:, None] + p.m[:, None]

    def _affine(self, p, cols):
        return p.d.astype(np.float64)[:, None], p.m.astype(np.float64)[:, None]

    def pack(self, p, q):
        q = self._check_codes(q, len(p)).astype(np.uint8)
        parts = [f16_bytes(p.d), f16_bytes(p.m)]
        if self.bits == 5:
            parts.append(pack_qh(q))
        parts.append(pack_nibbles(q & np.uint8(0x0F)))
        return np.concatenate(parts, axis=1)

    def unpack(self, data):
        b = self._data(data)
        if self.bits == 5:
            q = unpack_nibbles(b[:, 8:]) | unpack_qh(b[:, 4:8])
        else:
            q = unpack_nibbles(b[:, 4:])
        return Params(d=f16_from(b[:, :2]), m=f16_from(b[:, 2:4])), q.astype(np.int16)


# ---------------------------------------------------------------------------- K-quant fits

# Q4_K candidates: codes L = round((x - lo) * (15 + delta) / (hi - lo)); delta < 0 leaves the top
# code unused, delta > 0 clips the largest values.
_Q4K_DELTAS = np.arange(-1.0, 2.01, 0.25)
# Q6_K candidates: scale = (signed abs-max value) / divisor; negative divisors put it on code -32.
_Q6K_DIVISORS = (-32.0, -32.5, -33.0, -31.5, -31.0, -30.5, -30.0, -29.0, 31.0, 31.5, 30.5, 30.0, 29.0)


def _fit_min_scale(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x (..., n): a >= 0, m >= 0 with x ~= a * L - m, L in [0, nmax] (weighted LSQ)."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    rng = hi - lo
    sw = w.sum(axis=-1)
    sx = (w * x).sum(axis=-1)

    def err_of(a, b, L):
        r = a[..., None] * L + b[..., None] - x
        return (w * r * r).sum(axis=-1)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        best_a = rng / nmax
        L0 = np.clip(np.rint(np.where(rng[..., None] > 0, (x - lo[..., None]) / best_a[..., None], 0.0)), 0, nmax)
        best_b = lo.copy()
        best_e = err_of(best_a, best_b, L0)
        for delta in _Q4K_DELTAS:
            iscale = np.where(rng > 0, (nmax + delta) / rng, 0.0)
            L = np.clip(np.rint((x - lo[..., None]) * iscale[..., None]), 0, nmax)
            sl = (w * L).sum(axis=-1)
            sll = (w * L * L).sum(axis=-1)
            slx = (w * L * x).sum(axis=-1)
            det = sw * sll - sl * sl
            a = (sw * slx - sl * sx) / det
            b = (sll * sx - sl * slx) / det
            pos = b > 0  # the min must be <= 0 (stored as a non-negative "m" that is subtracted)
            a = np.where(pos, slx / sll, a)
            b = np.where(pos, 0.0, b)
            a = np.maximum(a, 0.0)
            e = err_of(a, b, L)
            ok = (det > 0) & (sll > 0) & np.isfinite(e) & (e < best_e)
            best_a = np.where(ok, a, best_a)
            best_b = np.where(ok, b, best_b)
            best_e = np.where(ok, e, best_e)
    return best_a, -best_b


def _fit_sym_scale(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per row of x (..., n): signed a with x ~= a * L, L in [-32, 31] (weighted LSQ refit)."""
    a_abs = np.abs(x)
    i = a_abs.argmax(axis=-1)
    mx = np.take_along_axis(x, i[..., None], axis=-1)[..., 0]

    def codes(a):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.clip(np.rint(np.where(a[..., None] != 0, x / a[..., None], 0.0)), -32, 31)

    def err_of(a, L):
        r = a[..., None] * L - x
        return (w * r * r).sum(axis=-1)

    best_a = mx / -32.0
    best_e = err_of(best_a, codes(best_a))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for div in _Q6K_DIVISORS:
            L = codes(mx / div)
            sll = (w * L * L).sum(axis=-1)
            a = (w * L * x).sum(axis=-1) / sll
            e = err_of(a, L)
            ok = (sll > 0) & np.isfinite(e) & (e < best_e)
            best_a = np.where(ok, a, best_a)
            best_e = np.where(ok, e, best_e)
    return best_a


def _round_sub_scales(v: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-block scales v (R, S) -> fp16 super scale (R,) and integer multiples in [lo, hi]."""
    amax = np.abs(v).max(axis=1)
    d = f16_finite(amax / hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(d[:, None] > 0, np.rint(v / d[:, None].astype(np.float64)), 0.0)
    return d, np.clip(k, lo, hi)


class _Q4_K(Codec):
    qtype, block, type_size, qmin, qmax, zero_code = QType.Q4_K, 256, 144, 0, 15, 0

    def fit(self, x, weight=None):
        x = self._blocks(x)
        w = importance_weights(weight, x.shape).reshape(-1, 8, 32)
        a, m = _fit_min_scale(x.astype(np.float64).reshape(-1, 8, 32), w, 15)
        d, sc = _round_sub_scales(a, 0, 63)
        dmin, mn = _round_sub_scales(m, 0, 63)
        return Params(d=d, m=dmin, sc=sc.astype(np.uint8), mn=mn.astype(np.uint8))

    def _dm1(self, p, cols):
        j = cols // 32
        d1 = p.d[:, None] * p.sc[:, j].astype(_F32)
        m1 = p.m[:, None] * p.mn[:, j].astype(_F32)
        return d1, m1

    def decode(self, p, q, cols):
        d1, m1 = self._dm1(p, self._cols(cols))
        return d1 * np.asarray(q).astype(_F32) - m1

    def _affine(self, p, cols):
        d1, m1 = self._dm1(p, cols)
        return d1.astype(np.float64), -m1.astype(np.float64)

    def pack(self, p, q):
        q = self._check_codes(q, len(p)).astype(np.uint8).reshape(-1, 4, 2, 32)
        sc = p.sc.astype(np.uint8)
        mn = p.mn.astype(np.uint8)
        scales = np.concatenate([
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4),
        ], axis=1)
        qs = (q[:, :, 0] | (q[:, :, 1] << np.uint8(4))).reshape(-1, 128)
        return np.concatenate([f16_bytes(p.d), f16_bytes(p.m), scales, qs], axis=1)

    def unpack(self, data):
        b = self._data(data)
        s = b[:, 4:16]
        sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
        mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
        qs = b[:, 16:].reshape(-1, 4, 1, 32)
        q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=2).reshape(-1, 256)
        p = Params(d=f16_from(b[:, 0:2]), m=f16_from(b[:, 2:4]), sc=sc, mn=mn)
        return p, q.astype(np.int16)


class _Q6_K(Codec):
    qtype, block, type_size, qmin, qmax, zero_code = QType.Q6_K, 256, 210, 0, 63, 32

    def fit(self, x, weight=None):
        x = self._blocks(x)
        w = importance_weights(weight, x.shape).reshape(-1, 16, 16)
        a = _fit_sym_scale(x.astype(np.float64).reshape(-1, 16, 16), w)
        d, sc = _round_sub_scales(a, -128, 127)
        return Params(d=d, sc=sc.astype(np.int8))

    def _ds(self, p, cols):
        return p.d[:, None] * p.sc[:, cols // 16].astype(_F32)

    def decode(self, p, q, cols):
        ds = self._ds(p, self._cols(cols))
        return ds * (np.asarray(q).astype(np.int16) - np.int16(32)).astype(_F32)

    def _affine(self, p, cols):
        ds = self._ds(p, cols).astype(np.float64)
        return ds, -32.0 * ds

    def pack(self, p, q):
        q = self._check_codes(q, len(p)).astype(np.uint8).reshape(-1, 2, 4, 32)  # (R, half, quarter, l)
        lo, hi = q & np.uint8(15), q >> np.uint8(4)
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
        return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64),
                               p.sc.astype(np.int8).view(np.uint8), f16_bytes(p.d)], axis=1)

    def unpack(self, data):
        b = self._data(data)
        ql = b[:, :128].reshape(-1, 2, 2, 32)  # (R, half, first/second 32 bytes, l)
        qh = b[:, 128:192].reshape(-1, 2, 1, 32)
        lo = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        hi = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
        q = (lo | (hi << np.uint8(4))).reshape(-1, 256)
        p = Params(d=f16_from(b[:, 208:210]), sc=b[:, 192:208].view(np.int8).copy())
        return p, q.astype(np.int16)


# ---------------------------------------------------------------------------- registry

_CODECS: dict[QType, Codec] = {
    QType.Q8_0: _Q8_0(),
    QType.Q4_0: _SymLegacy(QType.Q4_0, 4),
    QType.Q5_0: _SymLegacy(QType.Q5_0, 5),
    QType.Q4_1: _MinLegacy(QType.Q4_1, 4),
    QType.Q5_1: _MinLegacy(QType.Q5_1, 5),
    QType.Q4_K: _Q4_K(),
    QType.Q6_K: _Q6_K(),
}


def codec_for(qtype: QType | str) -> Codec:
    """The block codec of a quantized GGML type (F32/F16 have none)."""
    qt = as_qtype(qtype)
    try:
        return _CODECS[qt]
    except KeyError:
        raise EdgeqError(f"{qt.value} is not a block-quantized type; expected one of "
                         f"{[q.value for q in _CODECS]}") from None


def rtn_encode(x: np.ndarray, qtype: QType | str) -> np.ndarray:
    """Round-to-nearest GGML bytes of ``x`` (R, K) float32: (R, row_nbytes(qtype, K)) uint8.

    fit + encode + pack for every block of every row (vectorised).  For the 32-value types the
    bytes equal :func:`edgeq.quant.reference.quantize` (ggml's rule), for the K-quants they are
    our own fit (see the module docstring).
    """
    c = codec_for(qtype)
    x = np.asarray(x, _F32)
    if x.ndim != 2:
        raise EdgeqError(f"expected a 2-D (rows, cols) array, got shape {x.shape}")
    nb = row_nbytes(c.qtype, x.shape[1])
    blocks = np.ascontiguousarray(x).reshape(-1, c.block)
    out = np.empty((blocks.shape[0], c.type_size), np.uint8)
    step = max(1, _CHUNK_ELEMS // c.block)
    for s in range(0, blocks.shape[0], step):
        p, q = c.rtn(blocks[s:s + step])
        out[s:s + step] = c.pack(p, q)
    return out.reshape(x.shape[0], nb)

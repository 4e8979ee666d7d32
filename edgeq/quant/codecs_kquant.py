"""The K-quant block codecs (super-blocks of 256): Q4_K and Q6_K, with edgeq's own weighted
least-squares fits (see codecs.py)."""
from __future__ import annotations

import numpy as np

from edgeq.quant.blockops import f16_bytes, f16_finite, f16_from, importance_weights
from edgeq.quant.codec_base import Codec, Params
from edgeq.quant.formats import QType

_F32 = np.float32


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


class Q4_KCodec(Codec):
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


class Q6_KCodec(Codec):
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



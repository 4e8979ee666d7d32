"""The 32-value ("legacy") GGML block codecs: Q8_0, Q4_0 / Q5_0 (symmetric), Q4_1 / Q5_1 (with a
min); ggml's round-to-nearest rule (see codecs.py)."""
from __future__ import annotations

import numpy as np

from edgeq.quant.blockops import (
    f16,
    f16_bytes,
    f16_from,
    first_absmax,
    pack_nibbles,
    pack_qh,
    recip,
    roundf,
    unpack_nibbles,
    unpack_qh,
)
from edgeq.quant.codec_base import Codec, Params
from edgeq.quant.formats import FORMATS, QType

_F32 = np.float32


# ---------------------------------------------------------------------------- legacy (32)


def _pack_nibble_block(head: list[np.ndarray], q: np.ndarray, bits: int) -> np.ndarray:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 block bytes: the fp16 ``head`` (d, or d and m), for 5 bits the
    32 high bits ``qh``, then the low nibbles."""
    q = q.astype(np.uint8)
    parts = list(head)
    if bits == 5:
        parts.append(pack_qh(q))
    parts.append(pack_nibbles(q & np.uint8(0x0F)))
    return np.concatenate(parts, axis=1)


def _unpack_nibble_block(b: np.ndarray, head_bytes: int, bits: int) -> np.ndarray:
    """The codes of :func:`_pack_nibble_block` bytes whose fp16 head takes ``head_bytes``."""
    if bits == 5:
        q = unpack_nibbles(b[:, head_bytes + 4:]) | unpack_qh(b[:, head_bytes:head_bytes + 4])
    else:
        q = unpack_nibbles(b[:, head_bytes:])
    return q.astype(np.int16)


class Q8_0Codec(Codec):
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


class SymLegacyCodec(Codec):
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
        return _pack_nibble_block([f16_bytes(p.d)], self._check_codes(q, len(p)), self.bits)

    def unpack(self, data):
        b = self._data(data)
        return Params(d=f16_from(b[:, :2])), _unpack_nibble_block(b, 2, self.bits)


class MinLegacyCodec(Codec):
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
        return _pack_nibble_block([f16_bytes(p.d), f16_bytes(p.m)], self._check_codes(q, len(p)), self.bits)

    def unpack(self, data):
        b = self._data(data)
        return Params(d=f16_from(b[:, :2]), m=f16_from(b[:, 2:4])), _unpack_nibble_block(b, 4, self.bits)



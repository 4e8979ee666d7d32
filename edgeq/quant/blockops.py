"""Element-level pieces of quantized blocks, shared by the reference GGML quantizers
(:mod:`edgeq.quant.reference`), the block codecs (:mod:`edgeq.quant.codecs`) and the int-group
format (:mod:`edgeq.quant.intgroup`): C float rounding, fp16 fields, nibble / high-bit packing,
importance weights. numpy only; everything in float32 unless said otherwise.
"""
from __future__ import annotations

import numpy as np

from edgeq.errors import EdgeqError

_F32 = np.float32
F16_MAX = 65504.0


def recip(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` elementwise, in float32."""
    out = np.zeros_like(d)
    np.divide(_F32(1.0), d, out=out, where=d != 0)
    return out


def roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: round half away from zero, exactly (no ``x + 0.5`` double rounding)."""
    t = np.trunc(v)
    frac = v - t  # exact in binary floating point
    return t + np.where(np.abs(frac) >= _F32(0.5), np.sign(v), _F32(0.0))


def f16(v: np.ndarray) -> np.ndarray:
    """Round float32 values to fp16 (nearest even), kept as float32."""
    with np.errstate(over="ignore"):
        return np.asarray(v, _F32).astype(np.float16).astype(_F32)


def f16_finite(v: np.ndarray) -> np.ndarray:
    """fp16 rounding after clipping to the largest finite fp16 value (for our own fits)."""
    return f16(np.clip(np.asarray(v, np.float64), -F16_MAX, F16_MAX).astype(_F32))


def f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n,) float32 -> (n, 2) uint8: little-endian IEEE half, round-to-nearest-even."""
    return np.asarray(v, _F32).astype("<f2").view(np.uint8).reshape(-1, 2)


def f16_from(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 little-endian halves -> (n,) float32 (inverse of :func:`f16_bytes`)."""
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(_F32)


def first_absmax(b: np.ndarray) -> np.ndarray:
    """Signed value of the first element of largest magnitude per row (+0.0 for all-zero rows):
    ggml's strict ``amax < |v|`` scan, which keeps ``max = +0.0`` for zero blocks."""
    rows = np.arange(b.shape[0])
    a = np.abs(b)
    i = a.argmax(axis=1)
    return np.where(a[rows, i] > 0, b[rows, i], _F32(0.0))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) ints in [0, 15] -> (n, 16) uint8: byte j = q[j] | q[j + 16] << 4."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 -> (n, 32) uint8 in [0, 15] (inverse of :func:`pack_nibbles`)."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def pack_qh(q: np.ndarray) -> np.ndarray:
    """(n, 32) ints in [0, 31] -> (n, 4) uint8: little-endian uint32 whose bit j is bit 4 of q[j]."""
    bits = (q.astype(np.uint8) >> np.uint8(4)) & np.uint8(1)
    return np.packbits(bits, axis=1, bitorder="little")


def unpack_qh(qh: np.ndarray) -> np.ndarray:
    """(n, 4) uint8 -> (n, 32) uint8 holding 0 or 16 (bit 4 of each value)."""
    return np.unpackbits(qh, axis=1, bitorder="little") << np.uint8(4)


def importance_weights(weight, shape: tuple[int, int]) -> np.ndarray:
    """Broadcast an optional (block,) or (R, block) importance to ``shape`` as float64."""
    if weight is None:
        return np.ones(shape, np.float64)
    w = np.asarray(weight, np.float64)
    if w.shape not in ((shape[1],), shape):
        raise EdgeqError(f"expected weight of shape ({shape[1]},) or {shape}, got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise EdgeqError("expected finite non-negative weights")
    return np.broadcast_to(w, shape)

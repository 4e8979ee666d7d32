"""Reference (numpy, vectorised) GGML quantizers, bit-exact with ggml's ``quantize_row_*_ref``
for the 32-value block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; not the K-quants, see below).

For those, ``quantize`` returns the exact bytes llama.cpp stores in a GGUF tensor; ``dequantize`` inverts
it the way ggml's ``dequantize_row_*`` does.  All arithmetic is done in float32 with the same
operation order as the C reference (one rounding per C operation), so results match byte for
byte.  Rules reproduced from ggml (``ggml-quants.c``), per block of 32 values ``x``:

* Q8_0: ``amax = max|x|``; ``d = amax / 127``; ``id = d ? 1/d : 0``;
  ``q = roundf(x * id)`` (round half away from zero) as int8.  Block = fp16 d, int8 q[32].
* Q4_0: ``max`` = the *signed* value of the first element with the largest magnitude
  (+0.0 when the block is all zeros); ``d = max / -8``; ``id = d ? 1/d : 0``;
  ``q = min(15, (int)(x * id + 8.5f))``.  Block = fp16 d, then 16 bytes whose low nibbles hold
  ``q[0..15]`` and high nibbles ``q[16..31]``.
* Q4_1: ``min``/``max`` of the block (first occurrence, which decides the sign of a zero);
  ``d = (max - min) / 15``; ``id = d ? 1/d : 0``; ``q = min(15, (int)((x - min) * id + 0.5f))``.
  Block = fp16 d, fp16 min, 16 nibble-packed bytes as for Q4_0.
* Q5_0: as Q4_0 with ``d = max / -16`` and ``q = min(31, (int)(x * id + 16.5f))``.  Block = fp16 d,
  little-endian uint32 ``qh`` (bit j = bit 4 of ``q[j]``), then the low nibbles packed as Q4_0.
* Q5_1: as Q4_1 with ``d = (max - min) / 31`` and ``q = (int)((x - min) * id + 0.5f)`` (ggml
  applies no clamp here; for finite inputs the value never reaches 32).  Block = fp16 d,
  fp16 min, uint32 ``qh``, 16 nibble-packed bytes.

Q4_K and Q6_K (super-blocks of 256) are *not* quantized the ggml way: ggml searches scales
iteratively (``make_qkx2_quants`` / ``make_qx_quants``); here they go through our own
round-to-nearest fit in :mod:`edgeq.quant.codecs`, so their bytes differ from llama.cpp's but
are valid blocks that any GGML reader decodes to exactly what ``dequantize`` returns.
``dequantize`` is bit-exact with ggml for every type.

fp32 -> fp16 conversions round to nearest even (ggml's ``GGML_FP32_TO_FP16``), like numpy.
Inputs are assumed finite; blocks whose scale is so small (< 2**-128) that ``1/d`` overflows
are outside what ggml defines (its float -> int conversions become undefined behaviour).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.quant.blockops import f16_bytes, first_absmax, pack_nibbles, pack_qh, recip, roundf, unpack_nibbles, unpack_qh
from edgeq.quant.codecs import codec_for
from edgeq.quant.formats import FORMATS, QType, as_qtype, row_nbytes, tensor_nbytes

# Blocks processed per step: bounds temporaries to a few tens of MB whatever the tensor size.
_CHUNK_BLOCKS = 1 << 15

_F32 = np.float32


def _trunc_to_nibble(v: np.ndarray) -> np.ndarray:
    """``MIN(15, (int8_t)v)`` for v >= -1 (what the Q4 quantizers feed it)."""
    return np.minimum(np.trunc(v), _F32(15)).astype(np.uint8)


def _trunc_to_5bits(v: np.ndarray) -> np.ndarray:
    """``MIN(31, (int8_t)v)`` for v >= -1 (what the Q5 quantizers feed it)."""
    return np.minimum(np.trunc(v), _F32(31)).astype(np.uint8)


def _q8_0_blocks(b: np.ndarray) -> np.ndarray:
    amax = np.abs(b).max(axis=1)
    d = amax / _F32(127)
    iv = recip(d)
    q = roundf(b * iv[:, None]).astype(np.int8)
    return np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=1)


def _q4_0_blocks(b: np.ndarray) -> np.ndarray:
    mx = first_absmax(b)  # first occurrence; +0.0 for zero blocks, like ggml
    d = mx / _F32(-8)
    iv = recip(d)
    q = _trunc_to_nibble(b * iv[:, None] + _F32(8.5))
    return np.concatenate([f16_bytes(d), pack_nibbles(q)], axis=1)


def _q4_1_blocks(b: np.ndarray) -> np.ndarray:
    rows = np.arange(b.shape[0])
    mn = b[rows, b.argmin(axis=1)]  # first occurrence, like ggml's strict "v < min"
    mx = b[rows, b.argmax(axis=1)]
    d = (mx - mn) / _F32(15)
    iv = recip(d)
    q = _trunc_to_nibble((b - mn[:, None]) * iv[:, None] + _F32(0.5))
    return np.concatenate([f16_bytes(d), f16_bytes(mn), pack_nibbles(q)], axis=1)


def _q5_0_blocks(b: np.ndarray) -> np.ndarray:
    mx = first_absmax(b)
    d = mx / _F32(-16)
    iv = recip(d)
    q = _trunc_to_5bits(b * iv[:, None] + _F32(16.5))
    return np.concatenate([f16_bytes(d), pack_qh(q), pack_nibbles(q & np.uint8(0x0F))], axis=1)


def _q5_1_blocks(b: np.ndarray) -> np.ndarray:
    rows = np.arange(b.shape[0])
    mn = b[rows, b.argmin(axis=1)]
    mx = b[rows, b.argmax(axis=1)]
    d = (mx - mn) / _F32(31)
    iv = recip(d)
    q = _trunc_to_5bits((b - mn[:, None]) * iv[:, None] + _F32(0.5))
    return np.concatenate(
        [f16_bytes(d), f16_bytes(mn), pack_qh(q), pack_nibbles(q & np.uint8(0x0F))], axis=1)


def _dq_q8_0(blk: np.ndarray) -> np.ndarray:
    d = blk[:, :2].copy().view("<f2").astype(_F32)
    q = blk[:, 2:].view(np.int8).astype(_F32)
    return q * d


def _dq_q4_0(blk: np.ndarray) -> np.ndarray:
    d = blk[:, :2].copy().view("<f2").astype(_F32)
    q = unpack_nibbles(blk[:, 2:]).astype(_F32) - _F32(8)
    return q * d


def _dq_q4_1(blk: np.ndarray) -> np.ndarray:
    d = blk[:, :2].copy().view("<f2").astype(_F32)
    m = blk[:, 2:4].copy().view("<f2").astype(_F32)
    q = unpack_nibbles(blk[:, 4:]).astype(_F32)
    return q * d + m


def _dq_q5_0(blk: np.ndarray) -> np.ndarray:
    d = blk[:, :2].copy().view("<f2").astype(_F32)
    q = (unpack_nibbles(blk[:, 6:]) | unpack_qh(blk[:, 2:6])).astype(_F32) - _F32(16)
    return q * d


def _dq_q5_1(blk: np.ndarray) -> np.ndarray:
    d = blk[:, :2].copy().view("<f2").astype(_F32)
    m = blk[:, 2:4].copy().view("<f2").astype(_F32)
    q = (unpack_nibbles(blk[:, 8:]) | unpack_qh(blk[:, 4:8])).astype(_F32)
    return q * d + m


def _kquant_quantizer(qt: QType):
    def fn(b: np.ndarray) -> np.ndarray:
        c = codec_for(qt)
        p, q = c.rtn(b)
        return c.pack(p, q)
    return fn


def _kquant_dequantizer(qt: QType):
    def fn(blk: np.ndarray) -> np.ndarray:
        c = codec_for(qt)
        p, q = c.unpack(blk)
        return c.decode(p, q, np.arange(c.block))
    return fn


_QUANTIZERS = {QType.Q8_0: _q8_0_blocks, QType.Q4_0: _q4_0_blocks, QType.Q4_1: _q4_1_blocks,
               QType.Q5_0: _q5_0_blocks, QType.Q5_1: _q5_1_blocks,
               QType.Q4_K: _kquant_quantizer(QType.Q4_K), QType.Q6_K: _kquant_quantizer(QType.Q6_K)}
_DEQUANTIZERS = {QType.Q8_0: _dq_q8_0, QType.Q4_0: _dq_q4_0, QType.Q4_1: _dq_q4_1,
                 QType.Q5_0: _dq_q5_0, QType.Q5_1: _dq_q5_1,
                 QType.Q4_K: _kquant_dequantizer(QType.Q4_K), QType.Q6_K: _kquant_dequantizer(QType.Q6_K)}
# K-quant fits keep several (blocks, 256) float64 temporaries per candidate scale: smaller steps.
_CHUNK = {QType.Q4_K: 1 << 11, QType.Q6_K: 1 << 11}


def quantize(x: np.ndarray, qtype: QType | str) -> np.ndarray:
    """Encode ``x`` (rows along the last axis) in GGML format ``qtype``.

    Returns uint8 of shape ``x.shape[:-1] + (row_nbytes(qtype, x.shape[-1]),)`` holding exactly
    the bytes llama.cpp writes (F32/F16: the little-endian IEEE values), except for Q4_K / Q6_K,
    which are our own round-to-nearest fit (valid blocks, different bytes).
    """
    qt = as_qtype(qtype)
    x = np.asarray(x)
    if x.ndim == 0:
        raise EdgeqError("expected an array with at least one dimension, got a scalar")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise EdgeqError(f"expected a real-valued array, got dtype {x.dtype}")
    nb = row_nbytes(qt, x.shape[-1])
    out_shape = x.shape[:-1] + (nb,)
    if qt in (QType.F32, QType.F16):
        dt = "<f4" if qt is QType.F32 else "<f2"
        return np.ascontiguousarray(x, dtype=dt).view(np.uint8).reshape(out_shape)

    info = FORMATS[qt]
    blocks = np.ascontiguousarray(x, dtype=_F32).reshape(-1, info.block_size)
    out = np.empty((blocks.shape[0], info.type_size), dtype=np.uint8)
    fn = _QUANTIZERS[qt]
    step = _CHUNK.get(qt, _CHUNK_BLOCKS)
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(0, blocks.shape[0], step):
            out[s:s + step] = fn(blocks[s:s + step])
    return out.reshape(out_shape)


def dequantize(data: np.ndarray, qtype: QType | str, shape: Sequence[int]) -> np.ndarray:
    """Decode GGML bytes ``data`` (any shape, ``tensor_nbytes(qtype, shape)`` bytes) to float32 ``shape``."""
    qt = as_qtype(qtype)
    shape = tuple(int(s) for s in shape)
    need = tensor_nbytes(qt, shape)
    raw = np.ascontiguousarray(data)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    if raw.size != need:
        raise EdgeqError(f"{qt.value} tensor of shape {shape}: expected {need} bytes, got {raw.size}")
    raw = raw.reshape(-1)
    if qt is QType.F32:
        return raw.view("<f4").astype(_F32).reshape(shape)
    if qt is QType.F16:
        return raw.view("<f2").astype(_F32).reshape(shape)

    info = FORMATS[qt]
    blk = raw.reshape(-1, info.type_size)
    out = np.empty((blk.shape[0], info.block_size), dtype=_F32)
    fn = _DEQUANTIZERS[qt]
    for s in range(0, blk.shape[0], _CHUNK_BLOCKS):
        out[s:s + _CHUNK_BLOCKS] = fn(blk[s:s + _CHUNK_BLOCKS])
    return out.reshape(shape)


def roundtrip(x: np.ndarray, qtype: QType | str) -> np.ndarray:
    """``dequantize(quantize(x))``: the float32 values a runtime will actually see."""
    x = np.asarray(x)
    return dequantize(quantize(x, qtype), qtype, x.shape)

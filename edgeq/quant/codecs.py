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

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.quant.codec_base import Codec, Params
# (the short private aliases keep the registry table below as it was before the split)
from edgeq.quant.codecs_kquant import Q4_KCodec as _Q4_K
from edgeq.quant.codecs_kquant import Q6_KCodec as _Q6_K
from edgeq.quant.codecs_legacy import MinLegacyCodec as _MinLegacy
from edgeq.quant.codecs_legacy import Q8_0Codec as _Q8_0
from edgeq.quant.codecs_legacy import SymLegacyCodec as _SymLegacy
from edgeq.quant.formats import QType, as_qtype, row_nbytes

_F32 = np.float32

# Blocks per step in rtn_encode: bounds the K-quant fits' temporaries to a few tens of MB.
_CHUNK_ELEMS = 1 << 19

__all__ = ["Codec", "Params", "codec_for", "rtn_encode"]

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

"""The GGML tensor storage formats edgeq can write, and their byte sizes.

Every quantized format stores a row of ``n`` values as ``n / block_size`` consecutive blocks
of ``type_size`` bytes (the GGML layout: little-endian fp16 scale(s) and packed quants; the
per-type layouts are noted in ``FORMATS``).  F32 and F16 are "blocks" of one value.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from edgeq.errors import EdgeqError


class QType(str, Enum):
    F32 = "F32"
    F16 = "F16"
    Q8_0 = "Q8_0"
    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    Q4_K = "Q4_K"
    Q6_K = "Q6_K"


@dataclass(frozen=True)
class FormatInfo:
    block_size: int  # values per block
    type_size: int  # bytes per block
    ggml_type_id: int  # enum ggml_type value, as stored in a GGUF tensor header
    bits: int  # nominal bits per quantized value (excluding per-block scale overhead)

    @property
    def bits_per_weight(self) -> float:
        """Effective storage cost including scales, e.g. 4.5 for Q4_0."""
        return self.type_size * 8 / self.block_size


FORMATS: dict[QType, FormatInfo] = {
    QType.F32: FormatInfo(block_size=1, type_size=4, ggml_type_id=0, bits=32),
    QType.F16: FormatInfo(block_size=1, type_size=2, ggml_type_id=1, bits=16),
    # block_q4_0: fp16 d; uint8 qs[16] (low nibbles = values 0..15, high nibbles = 16..31)
    QType.Q4_0: FormatInfo(block_size=32, type_size=18, ggml_type_id=2, bits=4),
    # block_q4_1: fp16 d; fp16 m; uint8 qs[16]
    QType.Q4_1: FormatInfo(block_size=32, type_size=20, ggml_type_id=3, bits=4),
    # block_q5_0: fp16 d; uint32 qh (bit j = 5th bit of value j); uint8 qs[16] (nibbles as Q4_0)
    QType.Q5_0: FormatInfo(block_size=32, type_size=22, ggml_type_id=6, bits=5),
    # block_q5_1: fp16 d; fp16 m; uint32 qh; uint8 qs[16]
    QType.Q5_1: FormatInfo(block_size=32, type_size=24, ggml_type_id=7, bits=5),
    # block_q8_0: fp16 d; int8 qs[32]
    QType.Q8_0: FormatInfo(block_size=32, type_size=34, ggml_type_id=8, bits=8),
    # block_q4_K: fp16 d; fp16 dmin; uint8 scales[12] (6-bit scale + 6-bit min for 8 sub-blocks
    # of 32); uint8 qs[128] (per 64 values: low nibbles = first 32, high nibbles = next 32)
    QType.Q4_K: FormatInfo(block_size=256, type_size=144, ggml_type_id=12, bits=4),
    # block_q6_K: uint8 ql[128] (low 4 bits); uint8 qh[64] (high 2 bits); int8 scales[16]
    # (sub-blocks of 16); fp16 d
    QType.Q6_K: FormatInfo(block_size=256, type_size=210, ggml_type_id=14, bits=6),
}

# Formats whose quantizer in edgeq.quant.reference reproduces ggml's bytes exactly (the K-quants
# are written by our own round-to-nearest fit instead of ggml's iterative search).
GGML_EXACT: frozenset[QType] = frozenset(
    {QType.F32, QType.F16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1})


def as_qtype(qtype: QType | str) -> QType:
    """Accept a QType or its name ("Q4_0", case-insensitive)."""
    if isinstance(qtype, QType):
        return qtype
    try:
        return QType(str(qtype).upper())
    except ValueError:
        raise EdgeqError(
            f"expected a quantization type in {[q.value for q in QType]}, got {qtype!r}") from None


def format_info(qtype: QType | str) -> FormatInfo:
    return FORMATS[as_qtype(qtype)]


def row_nbytes(qtype: QType | str, n_cols: int) -> int:
    """Bytes used by one row of ``n_cols`` values; ``n_cols`` must be a multiple of the block size."""
    qt = as_qtype(qtype)
    info = FORMATS[qt]
    n_cols = int(n_cols)
    if n_cols < 0 or n_cols % info.block_size:
        raise EdgeqError(
            f"{qt.value}: expected a row length that is a multiple of {info.block_size}, got {n_cols}")
    return n_cols // info.block_size * info.type_size


def tensor_nbytes(qtype: QType | str, shape: Sequence[int]) -> int:
    """Bytes used by a tensor of ``shape`` (rows along the last dimension)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise EdgeqError("expected a tensor shape with at least one dimension, got ()")
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    return n_rows * row_nbytes(qtype, shape[-1])

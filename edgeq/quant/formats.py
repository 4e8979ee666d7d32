"""The GGML view of the storage-type registry: ``QType`` / ``FORMATS`` and byte sizes.

Every quantized format stores a row of ``n`` values as ``n / block_size`` consecutive blocks
of ``type_size`` bytes (the GGML layout: little-endian fp16 scale(s) and packed quants; the
per-type layouts are the ``layout`` of each entry in :mod:`edgeq.quant.storage`, where the
types, their sizes and GGML ids are registered).  F32 and F16 are "blocks" of one value.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from edgeq.errors import EdgeqError
from edgeq.quant import storage

# The GGML types edgeq writes, e.g. QType.Q4_0 == "Q4_0", in the registry's order.
QType = Enum("QType", [(t.name, t.name) for t in storage.ggml_types()], type=str, module=__name__)


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
    QType(t.name): FormatInfo(block_size=t.block_size, type_size=t.type_size, ggml_type_id=t.ggml_type_id,
                              bits=t.bits)
    for t in storage.ggml_types()
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

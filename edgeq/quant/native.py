"""ggml's own quantizer (``ggml_quantize_chunk`` in the libggml that llama-cpp-python ships).

Used by the GGUF writer to encode float tensors: for Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 its bytes
are exactly those of :func:`edgeq.quant.reference.quantize` (tested), only ~3x faster; for the
K-quants (Q4_K / Q6_K) it *is* llama.cpp's quantizer (what ``llama_model_quantize`` writes without
an importance matrix), ~10x faster than our own round-to-nearest fit. Rows are split over threads
(ctypes releases the GIL; rows are encoded independently, so the bytes do not depend on the split).
Planned builds keep edgeq's codecs (GPTQ emits codes on their grids); this is the plain path.

:func:`available` is False when llama_cpp is not installed (then callers use the numpy reference).
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgeq.quant.formats import FORMATS, QType

# the types ggml_quantize_chunk encodes without an importance matrix, as edgeq names them
NATIVE_TYPES = frozenset({QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q6_K})
MIN_ROWS_PER_THREAD = 64


@lru_cache(maxsize=1)
def _fn():
    try:
        import llama_cpp
    except ImportError:
        return None
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    try:
        lib = ctypes.CDLL(str(path))
        f = lib.ggml_quantize_chunk
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]
    return f


def available() -> bool:
    return _fn() is not None


def _threads() -> int:
    return max(1, int(os.environ.get("EDGEQ_THREADS", "0")) or (os.cpu_count() or 1))


def quantize(x: np.ndarray, qt: QType) -> np.ndarray:
    """(rows, n) float32 -> (rows, row bytes) uint8 in GGML format ``qt`` (one of NATIVE_TYPES)."""
    f = _fn()
    if f is None or qt not in NATIVE_TYPES:
        raise ValueError(f"ggml's quantizer is not available for {qt}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    rows, n = x.shape
    info = FORMATS[qt]
    if n % info.block_size:
        raise ValueError(f"{qt.value}: row length {n} is not a multiple of {info.block_size}")
    row_bytes = n // info.block_size * info.type_size
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    nt = min(_threads(), max(1, rows // MIN_ROWS_PER_THREAD))
    bounds = np.linspace(0, rows, nt + 1).astype(np.int64)

    def run(i):
        r0, r1 = int(bounds[i]), int(bounds[i + 1])
        if r1 > r0:  # ggml indexes src and dst from ``start`` (in values)
            done = f(info.ggml_type_id, x.ctypes.data, out.ctypes.data, r0 * n, r1 - r0, n, None)
            if done != (r1 - r0) * row_bytes:
                raise RuntimeError(f"ggml_quantize_chunk wrote {done} bytes, expected {(r1 - r0) * row_bytes}")

    if nt == 1:
        run(0)
    else:
        with ThreadPoolExecutor(nt) as ex:
            list(ex.map(run, range(nt)))
    return out

"""llama.cpp's own quantizer (``ggml_quantize_chunk`` in the libggml-base that llama-cpp-python
ships), called through ctypes: an oracle independent of edgeq's codecs."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=1)
def _quantize_chunk():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]
    return f


def ggml_quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """``x`` (rows, cols) float32 quantized by ggml to ``type_name`` (e.g. "Q4_K"): uint8 rows."""
    import gguf

    gt = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[gt]
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, cols // block * size), np.uint8)
    n = _quantize_chunk()(int(gt), x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    assert n == out.nbytes, (n, out.nbytes)
    return out

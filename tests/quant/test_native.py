"""edgeq.quant.native (ggml's own quantizer): the legacy types' bytes equal the numpy reference
quantizer's (our independent, bit-exact re-implementation), edge values included; the K-quants'
equal what llama_model_quantize writes (tests/backends/gguf/test_lower.py); thread splits agree."""
from __future__ import annotations

import numpy as np
import pytest

from edgeq.quant import native
from edgeq.quant.formats import QType
from edgeq.quant.reference import dequantize, quantize

LEGACY = [QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]


def _inputs():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((300, 512)) * rng.uniform(1e-4, 10, (300, 1))).astype(np.float32)
    x[0] = 0.0  # an all-zero row
    x[1, :32] = -0.0
    x[2] = 1e30  # huge
    x[3, ::2] = 1e-30  # tiny
    x[4] = np.tile([1.0, -1.0], 256)  # ties on the grid
    return x


def test_available_here():
    assert native.available()  # llama-cpp-python is a dependency: the fast path must be used


@pytest.mark.parametrize("qt", LEGACY)
def test_legacy_bytes_equal_the_reference(qt):
    x = _inputs()
    assert native.quantize(x, qt).tobytes() == quantize(x, qt).tobytes()


@pytest.mark.parametrize("qt", [QType.Q4_K, QType.Q6_K, QType.Q4_0])
def test_thread_split_does_not_change_bytes(qt, monkeypatch):
    x = _inputs()[:, :512]
    monkeypatch.setenv("EDGEQ_THREADS", "1")
    one = native.quantize(x, qt).tobytes()
    monkeypatch.setenv("EDGEQ_THREADS", "3")
    monkeypatch.setattr(native, "MIN_ROWS_PER_THREAD", 1)
    assert native.quantize(x, qt).tobytes() == one


@pytest.mark.parametrize("qt", [QType.Q4_K, QType.Q6_K])
def test_k_quants_decode_close(qt):
    x = _inputs()[5:]
    back = dequantize(native.quantize(x, qt), qt, x.shape)
    rel = np.sqrt(np.mean((back - x) ** 2, axis=1)) / np.sqrt(np.mean(x ** 2, axis=1))
    assert rel.max() < {QType.Q4_K: 0.15, QType.Q6_K: 0.04}[qt]


def test_refuses_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        native.quantize(np.zeros((2, 40), np.float32), QType.Q4_0)
    with pytest.raises(ValueError, match="not available"):
        native.quantize(np.zeros((2, 32), np.float32), QType.F16)

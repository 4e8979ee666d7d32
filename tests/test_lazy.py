"""edgeq.lazy + the lazy safetensors reader: values equal the eager reader's, bf16 exact."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgeq.frontend.safetensors_io import lazy_safetensors, read_safetensors
from edgeq.lazy import LazyTensor, is_lazy, materialize


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (round to nearest even), as uint16."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.fixture()
def st_file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"w32": rng.standard_normal((37, 24)).astype(np.float32),
               "w16": rng.standard_normal((5, 8)).astype(np.float16),
               "norm": rng.standard_normal(24).astype(np.float32),
               "ids": np.arange(6, dtype=np.int64)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    # a bf16 tensor: safetensors.numpy cannot write one; patch the header of a u16 file instead
    raw = _bf16(rng.standard_normal((9, 16)).astype(np.float32))
    p2 = tmp_path / "b.safetensors"
    save_file({"wb": raw}, str(p2))
    data = p2.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b'"U16"', b'"BF16"')
    p2.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])
    return path, p2, tensors, raw


def test_lazy_equals_eager(st_file):
    path, p2, tensors, raw = st_file
    lazy, eager = lazy_safetensors(path), read_safetensors(path)
    assert set(lazy) == set(eager)
    assert is_lazy(lazy["w32"]) and is_lazy(lazy["w16"])
    assert not is_lazy(lazy["norm"]) and not is_lazy(lazy["ids"])  # 1-D and integer tensors read now
    for k in eager:
        np.testing.assert_array_equal(np.asarray(lazy[k]), eager[k])
        assert np.asarray(lazy[k]).dtype == eager[k].dtype
    t = lazy["w32"]
    assert t.shape == (37, 24) and t.dtype == np.float32 and t.size == 37 * 24 and t.ndim == 2
    np.testing.assert_array_equal(t[3:11], tensors["w32"][3:11])  # a row slice reads those rows
    np.testing.assert_array_equal(t[:, 5], tensors["w32"][:, 5])
    np.testing.assert_array_equal(t[[4, 1]], tensors["w32"][[4, 1]])
    np.testing.assert_array_equal(t.T, tensors["w32"].T)
    np.testing.assert_array_equal(t * 2 + 1, tensors["w32"] * 2 + 1)
    np.testing.assert_array_equal(np.ones((2, 37), np.float32) @ t, np.ones((2, 37), np.float32) @ tensors["w32"])
    np.testing.assert_array_equal(t.astype(np.float64), tensors["w32"].astype(np.float64))
    assert materialize(t).shape == (37, 24)


def test_bf16_widened_exactly(st_file):
    _, p2, _, raw = st_file
    t = lazy_safetensors(p2)["wb"]
    assert isinstance(t, LazyTensor) and t.stored == "BF16"
    want = (raw.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(np.asarray(t), want)
    np.testing.assert_array_equal(read_safetensors(p2)["wb"], want)
    import torch  # the independent oracle for bf16 -> f32
    np.testing.assert_array_equal(torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float().numpy(), want)

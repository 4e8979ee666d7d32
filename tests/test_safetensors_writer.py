"""The streaming safetensors writer writes exactly the bytes of safetensors' own save_file, and
the safetensors reader reads them back."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from edgeq.errors import EdgeqError
from edgeq.safetensors_writer import SafetensorsWriter, save_streaming

DTYPES = ["bool", "uint8", "int8", "int16", "uint16", "float16", "int32", "uint32", "float32", "float64",
          "int64", "uint64"]


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i, dt in enumerate(DTYPES):  # names deliberately not in dtype order
        shape = [(3,), (2, 5), (4, 1, 3), (7,)][i % 4]
        out[f"{'zyxwvutsrqpo'[i]}.t{i}"] = (rng.standard_normal(shape) * 50).astype(dt)
    out.update({"B": rng.standard_normal((6, 4)).astype(np.float32), "_x": np.zeros((0, 3), np.float32),
                "scalar": np.array(1.5, np.float32), "blk.10.w": np.arange(12, dtype=np.float32),
                "blk.9.w": np.arange(3, dtype=np.float32), "é": np.ones(2, np.int64)})
    return out


@pytest.mark.parametrize("n", [0, 1, 2, 5, 18])
def test_bytes_equal_save_file(tmp_path, n):
    arrays = dict(list(_arrays(n).items())[:n])
    save_file(arrays, str(tmp_path / "ref.safetensors"))
    with SafetensorsWriter(tmp_path / "ours.safetensors", {k: (v.dtype, v.shape) for k, v in arrays.items()}) as st:
        for k in reversed(list(arrays)):  # any order
            st.write(k, arrays[k])
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_metadata_and_chunked_rows_equal_save_file(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((10, 3, 4)).astype(np.float32)
    b = rng.integers(0, 255, (5, 8)).astype(np.uint8)
    meta = {"format": "pt"}  # one key: save_file writes several in a random (hash) order, we sort them
    save_file({"w": w, "b": b}, str(tmp_path / "ref.safetensors"), metadata=meta)
    with SafetensorsWriter(tmp_path / "ours.safetensors", {"w": (w.dtype, w.shape), "b": (b.dtype, b.shape)},
                           metadata=meta) as st:
        st.write("w", w[7:], start=7)
        st.write("b", b)
        st.write("w", w[:3])
        st.write("w", w[3:7], start=3)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(str(tmp_path / "ours.safetensors"), "numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("w"), w)
        assert f.metadata() == meta
    meta2 = {"zz": "2", "a": "1", "format": "pt"}
    with SafetensorsWriter(tmp_path / "m.safetensors", {"b": (b.dtype, b.shape)}, metadata=meta2) as st:
        st.write("b", b)
    with safe_open(str(tmp_path / "m.safetensors"), "numpy") as f:
        assert f.metadata() == meta2
        np.testing.assert_array_equal(f.get_tensor("b"), b)
    assert b'{"__metadata__":{"a":"1","format":"pt","zz":"2"}' in (tmp_path / "m.safetensors").read_bytes()


def test_save_streaming_reads_lazy_tensors_in_chunks(tmp_path, monkeypatch):
    from edgeq import streaming
    from edgeq.frontend.safetensors_io import lazy_safetensors

    rng = np.random.default_rng(2)
    src = {"a": rng.standard_normal((37, 8)).astype(np.float32), "v": np.arange(5, dtype=np.int64)}
    save_file(src, str(tmp_path / "src.safetensors"))
    lazy = lazy_safetensors(tmp_path / "src.safetensors")
    monkeypatch.setattr(streaming, "STREAM_CHUNK_VALUES", 8 * 4)  # 4 rows per chunk
    arrays = {"a": lazy["a"], "v": src["v"]}
    save_streaming(tmp_path / "out.safetensors", {k: (v.dtype, v.shape) for k, v in arrays.items()}, arrays.__getitem__)
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "src.safetensors").read_bytes()


def test_refuses_undeclared_mismatched_and_incomplete(tmp_path):
    st = SafetensorsWriter(tmp_path / "x.safetensors", {"w": (np.float32, (4, 2))})
    with pytest.raises(EdgeqError, match="not declared"):
        st.write("v", np.zeros(2, np.float32))
    with pytest.raises(EdgeqError, match="declared float32"):
        st.write("w", np.zeros((4, 2), np.float64))
    with pytest.raises(EdgeqError, match="declared"):
        st.write("w", np.zeros((2, 2), np.float32), start=3)
    st.write("w", np.zeros((2, 2), np.float32))
    with pytest.raises(EdgeqError, match="not written"):
        st.close()


def test_aligned_data_section_reads_back_with_safetensors(tmp_path):
    """``align=64`` pads the header so that the data section starts at a multiple of 64; the
    file stays a valid safetensors file (safetensors' own reader) with the same arrays."""
    from safetensors.numpy import load_file

    from edgeq.frontend.safetensors_io import read_header
    from edgeq.safetensors_writer import SafetensorsWriter

    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "bb": np.arange(5, dtype=np.int64),
              "c": np.arange(64, dtype=np.uint8)}
    for align in (8, 64, 128):
        p = tmp_path / f"x{align}.safetensors"
        with SafetensorsWriter(p, {k: (v.dtype, v.shape) for k, v in arrays.items()}, align=align) as st:
            for k, v in arrays.items():
                st.write(k, v)
        _, start = read_header(p)
        assert start % align == 0
        back = load_file(str(p))
        for k, v in arrays.items():
            np.testing.assert_array_equal(back[k], v)

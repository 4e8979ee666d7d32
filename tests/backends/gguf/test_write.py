"""The streaming GGUF writer: chunked encoding is byte-identical to whole-tensor encoding, and a
model loaded lazily writes the same file as the same model held in memory."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from edgeq.frontend import load_model
from edgeq.lazy import is_lazy
from edgeq.backends.gguf import write as lower_gguf
from edgeq.backends.gguf.types import tensor_types
from edgeq.quant.formats import QType


@pytest.mark.parametrize("qt", list(QType))
def test_chunked_encoding_is_whole_encoding(qt, monkeypatch):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((301, 512)) * 0.05).astype(np.float32)
    whole = lower_gguf._encode(w, qt)[0].tobytes()
    monkeypatch.setattr(lower_gguf, "STREAM_CHUNK_VALUES", 512 * 7)  # 7 rows per chunk, ragged end
    chunks = list(lower_gguf._encoded_chunks(w, qt))
    assert len(chunks) == 43
    assert b"".join(c.tobytes() for c in chunks) == whole


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("bits", [4, 8, 32])
def test_lazy_model_writes_the_same_file(tiny_llama, tmp_path, bits, monkeypatch):
    ir = load_model(tiny_llama)
    assert all(is_lazy(l.weight) for l in ir.linears.values())
    eager = ir.replace(linears={k: dataclasses.replace(v, weight=np.asarray(v.weight)) for k, v in ir.linears.items()},
                       tensors={k: np.asarray(v) for k, v in ir.tensors.items()})
    types = tensor_types(ir, bits)
    monkeypatch.setattr(lower_gguf, "STREAM_CHUNK_VALUES", 64 * 5)  # force chunking on tiny tensors
    lower_gguf.write_gguf(ir, tmp_path / "lazy.gguf", types)
    monkeypatch.setattr(lower_gguf, "STREAM_CHUNK_VALUES", 1 << 30)
    lower_gguf.write_gguf(eager, tmp_path / "eager.gguf", types)
    assert _sha(tmp_path / "lazy.gguf") == _sha(tmp_path / "eager.gguf")
    # gguf-py (the independent reader) sees every tensor with the planned type and shape
    import gguf

    r = gguf.GGUFReader(tmp_path / "lazy.gguf")
    got = {t.name: t for t in r.tensors}
    for name, qt in types.items():
        t = got[lower_gguf.gguf_tensor_name(name)]
        assert t.tensor_type.name == qt.value
    emb = got["token_embd.weight"]
    if types["token_embd"] == QType.F32:
        np.testing.assert_array_equal(np.asarray(emb.data).reshape(ir.tensors["token_embd"].shape),
                                      np.asarray(ir.tensors["token_embd"]))

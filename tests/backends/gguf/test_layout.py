"""edgeq.backends.gguf.layout: IR -> GGUF tensor names."""
from __future__ import annotations

from edgeq.backends.gguf.lower import gguf_tensor_name
# registered by conftest.py (the tests are not a package)


def test_gguf_tensor_names():
    assert gguf_tensor_name("blk.3.ffn_down") == "blk.3.ffn_down.weight"
    assert gguf_tensor_name("blk.0.attn_q.bias") == "blk.0.attn_q.bias"
    assert gguf_tensor_name("token_embd") == "token_embd.weight"

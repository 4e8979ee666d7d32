"""edgeq.backends.gguf.lora: LoRA-adapter GGUFs in llama.cpp vs the merged model; their layout."""
from __future__ import annotations

import numpy as np
import pytest

import gguf

from edgeq.errors import EdgeqError
from edgeq.ir import Arch, Role
from edgeq.backends.gguf.lower import tensor_types, write_gguf, write_lora_gguf
# registered by conftest.py (the tests are not a package)
from edgeq_tests_gguf_tiny import add_lora, llamacpp_logits, reference_logits, tiny_ir

LORA_MAX_ABS_DIFF = 1e-3  # F32 base + F32 adapter vs the merged model


@pytest.mark.parametrize("arch", [Arch.LLAMA, Arch.QWEN2])
def test_lora_gguf_matches_merged_model(tmp_path, arch):
    from edgeq.frontend import merge_adapters

    ir = tiny_ir(arch)
    with_x = add_lora(ir, "x", 1)
    # "y": a constant scale whatever the rank, so alpha/rank cannot express it -> folded into B
    both = add_lora(with_x, "y", 2, roles=(Role.Q, Role.V, Role.DOWN), rank=2, scale=0.7)
    base = write_gguf(both, tmp_path / "base.gguf", tensor_types(ir, 32), allow_low_rank=True)
    x = write_lora_gguf(both, "x", tmp_path / "x.gguf")
    y = write_lora_gguf(both, "lora:y", tmp_path / "y.gguf")
    merged = reference_logits(merge_adapters(with_x))
    assert np.abs(merged - reference_logits(ir)).max() > 0.1  # the adapter matters
    assert np.abs(llamacpp_logits(base, lora_paths=[x]) - merged).max() < LORA_MAX_ABS_DIFF
    both_ref = reference_logits(both)
    assert np.abs(llamacpp_logits(base, lora_paths=[x, y]) - both_ref).max() < LORA_MAX_ABS_DIFF


def test_lora_gguf_layout(tmp_path):
    ir = add_lora(tiny_ir(), "ft", 3, rank=4, alpha=16.0)
    p = write_lora_gguf(ir, "ft", tmp_path / "a.gguf", dtype="F16")
    r = gguf.GGUFReader(p)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama"
    assert kv["adapter.lora.alpha"] == pytest.approx(16.0)
    t = {x.name: x for x in r.tensors}
    a, b = t["blk.0.attn_k.weight.lora_a"], t["blk.0.attn_k.weight.lora_b"]
    # ggml ne order: lora_a [in, rank], lora_b [rank, out]
    assert [int(v) for v in a.shape] == [64, 4] and [int(v) for v in b.shape] == [4, 32]
    assert a.tensor_type.name == "F16"
    assert len(t) == 2 * len(ir.linears)
    with pytest.raises(EdgeqError, match="no low-rank branches"):
        write_lora_gguf(ir, "other", tmp_path / "b.gguf")

"""edgeq.backends.gguf.types: the type plan against llama.cpp's own quantizer."""
from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest

import gguf

from edgeq.errors import EdgeqError
from edgeq.ir import Arch
from edgeq.backends.gguf.lower import check, llamacpp_output_type, tensor_types, write_gguf
from edgeq.quant import QType
# registered by conftest.py (the tests are not a package)
from edgeq_tests_gguf_tiny import ARCH_TIED, tiny_ir



def test_type_plan_rule_smollm2_shape():
    # SmolLM2-135M: hidden 576 (a multiple of 32, not of 256), tied embeddings
    ir = tiny_ir(hidden=576, heads=9, kv=3, ffn=64, layers=1)
    assert llamacpp_output_type(576, 4) == "Q8_0"
    plan = tensor_types(ir, 4)
    assert plan["token_embd"] == QType.Q8_0
    assert plan["blk.0.attn_q"] == plan["blk.0.ffn_down"] == plan["blk.0.attn_v"] == QType.Q4_0
    assert plan["blk.0.attn_norm"] == plan["output_norm"] == QType.F32
    assert "output" not in plan
    assert tensor_types(ir, "Q4_1")["blk.0.ffn_up"] == QType.Q4_1
    assert set(tensor_types(ir, 8).values()) == {QType.Q8_0, QType.F32}


def test_type_plan_rule_untied_and_q6k_case():
    ir = tiny_ir(tied=False)
    plan = tensor_types(ir, 4)
    assert plan["token_embd"] == QType.Q4_0 and plan["output"] == QType.Q8_0
    # hidden a multiple of 256: llama.cpp picks Q6_K for the head, and so does edgeq
    assert llamacpp_output_type(256, 4) == "Q6_K"
    assert llamacpp_output_type(2048, "Q4_1") == "Q6_K"
    assert llamacpp_output_type(256, 8) == "Q8_0"
    assert llamacpp_output_type(96, "Q4_1") == "Q8_0"
    assert llamacpp_output_type(64, 16) == "F16"
    big = tiny_ir(hidden=256, ffn=64, layers=1)
    assert tensor_types(big, 4)["token_embd"] == QType.Q6_K
    big_untied = tiny_ir(hidden=256, ffn=64, layers=1, tied=False)
    plan = tensor_types(big_untied, 4)
    assert plan["output"] == QType.Q6_K and plan["token_embd"] == QType.Q4_0


def test_type_plan_overrides():
    ir = tiny_ir(tied=False)
    plan = tensor_types(ir, 4, {"blk.0.attn_v": 8, "re:blk\\.\\d+\\.ffn_down": "Q4_1", "_default": "Q8_0"})
    assert plan["blk.0.attn_v"] == QType.Q8_0
    assert plan["blk.1.ffn_down"] == plan["blk.0.ffn_down"] == QType.Q4_1
    assert plan["blk.1.attn_q"] == QType.Q8_0  # _default replaced the base
    assert plan["output"] == QType.Q8_0
    with pytest.raises(EdgeqError, match="unknown tensor"):
        tensor_types(ir, 4, {"blk.9.attn_q": 8})
    with pytest.raises(EdgeqError, match="expected bits"):
        tensor_types(ir, 3)


def test_type_plan_rejects_rows_not_multiple_of_block():
    ir = tiny_ir(hidden=48, heads=4, kv=2, ffn=64, layers=1)
    with pytest.raises(EdgeqError, match="multiple of 32"):
        tensor_types(ir, 4)
    assert tensor_types(ir, 16)["blk.0.attn_q"] == QType.F16
    assert any("multiple of 32" in p for p in check(ir, {"blk.0.attn_q": QType.Q8_0}))


@pytest.mark.parametrize("hidden", [64, 256])
@pytest.mark.parametrize("arch,tied", ARCH_TIED)
def test_type_plan_matches_llama_model_quantize(tmp_path, arch, tied, hidden):
    """Quantize our F32 GGUF with llama.cpp's own llama_model_quantize and compare: same tensor
    types, same file size, byte-identical tensor data (a Q6_K head included: edgeq.quant.native)."""
    import llama_cpp
    ir = tiny_ir(arch, hidden=hidden, ffn=128, tied=tied)
    src = write_gguf(ir, tmp_path / "f32.gguf", tensor_types(ir, 32))
    for name, ftype in {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 1
        theirs_p, mine_p = tmp_path / f"llama-{name}.gguf", tmp_path / f"edgeq-{name}.gguf"
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(theirs_p).encode(), ctypes.byref(params)) == 0
        write_gguf(ir, mine_p, tensor_types(ir, name))
        theirs = {t.name: t for t in gguf.GGUFReader(theirs_p).tensors}
        mine = {t.name: t for t in gguf.GGUFReader(mine_p).tensors}
        assert set(theirs) == set(mine)
        q6k = {k for k, t in theirs.items() if t.tensor_type.name == "Q6_K"}
        expect_q6k = llamacpp_output_type(hidden, name) == "Q6_K"
        assert q6k == ({"token_embd.weight" if tied else "output.weight"} if expect_q6k else set())
        for k in theirs:
            assert theirs[k].tensor_type == mine[k].tensor_type, (name, k)
        for k in theirs:  # the Q6_K head too: the GGUF writer encodes with ggml's own quantizer
            assert theirs[k].data.tobytes() == mine[k].data.tobytes(), (name, k)
        assert theirs_p.stat().st_size == mine_p.stat().st_size


def test_cli_bits4_build_of_an_untied_256_wide_head_matches_llama_model_quantize(tmp_path):
    """Issue 18 defect 5: `edgeq build --bits 4` of a model whose untied output matrix is a
    multiple of 256 wide (the Llama-3.2-1B case) wrote output.weight as Q8_0 where llama.cpp
    writes Q6_K. Same source F32 GGUF through both quantizers: every tensor's type must agree,
    and the files must have the same size; the artifact must verify."""
    import llama_cpp
    from click.testing import CliRunner

    from edgeq.cli import main

    ir = tiny_ir(Arch.LLAMA, hidden=256, ffn=128, tied=False)
    src = write_gguf(ir, tmp_path / "f32.gguf", tensor_types(ir, 32))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = 2, 1  # LLAMA_FTYPE_MOSTLY_Q4_0
    theirs_p = tmp_path / "llama-q4_0.gguf"
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(theirs_p).encode(), ctypes.byref(params)) == 0
    art = tmp_path / "art"
    r = CliRunner().invoke(main, ["build", str(src), "--bits", "4", "-o", str(art)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs_p).tensors}
    mine = {t.name: t.tensor_type.name for t in gguf.GGUFReader(art / "model.gguf").tensors}
    assert theirs["output.weight"] == "Q6_K" and theirs["token_embd.weight"] == "Q4_0"
    assert mine == theirs
    assert (art / "model.gguf").stat().st_size == theirs_p.stat().st_size
    m = json.loads((art / "manifest.json").read_text())
    assert m["tensor_types"]["output"] == "Q6_K"
    r = CliRunner().invoke(main, ["verify", str(art)], catch_exceptions=False)
    assert r.exit_code == 0, r.output

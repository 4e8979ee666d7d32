import json
import shutil

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.frontend import load_model
from edgeq.ir import Arch, Role


def test_tiny_llama_loads_with_gqa_and_untied_head(tiny_llama):
    ir = load_model(tiny_llama)
    hp = ir.hparams
    assert hp.arch is Arch.LLAMA
    assert hp.num_kv_heads < hp.num_heads
    assert not hp.tie_word_embeddings and "output" in ir.tensors
    assert ir.linear(0, Role.Q).bias is None
    assert ir.tokenizer is not None and len(ir.tokenizer.tokens) <= hp.vocab_size


def test_tiny_qwen2_has_qkv_biases_and_rope_theta(tiny_qwen2):
    ir = load_model(tiny_qwen2)
    cfg = json.loads((tiny_qwen2 / "config.json").read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    assert ir.hparams.arch is Arch.QWEN2
    assert ir.hparams.rope_theta == pytest.approx(theta)
    for role in (Role.Q, Role.K, Role.V):
        assert ir.linear(0, role).bias is not None
    assert ir.linear(0, Role.O).bias is None
    assert ir.hparams.tie_word_embeddings and "output" not in ir.tensors


def test_truncated_safetensors_is_refused(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(EdgeqError, match="truncated"):
        load_model(bad)


def test_garbage_safetensors_is_refused(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(EdgeqError, match="safetensors"):
        load_model(bad)


def test_unknown_architecture_is_refused(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeqError, match="unknown architecture 'mamba'"):
        load_model(bad)


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_llama):
    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(EdgeqError, match="safetensors only"):
        load_model(d)


def test_weights_equal_the_checkpoint(tiny_llama):
    from edgeq.frontend.safetensors_io import read_safetensors

    raw = read_safetensors(tiny_llama / "model.safetensors")
    ir = load_model(tiny_llama)
    np.testing.assert_array_equal(ir.linear(1, Role.DOWN).weight, raw["model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(ir.tensors["token_embd"], raw["model.embed_tokens.weight"])

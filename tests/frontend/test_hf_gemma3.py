"""Gemma 3 checkpoints in the HF front end: config forms (transformers 5's per-layer-type
rope_parameters and the older flat keys), the (1 + w) norm convention, the SentencePiece-style
tokenizer, and what is refused."""
import json
import shutil

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.frontend import load_model
from edgeq.ir import FULL, SLIDING


def _copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_hparams_and_effective_norms(tiny_gemma3):
    from safetensors.numpy import load_file

    ir = load_model(tiny_gemma3)
    hp = ir.hparams
    assert (hp.hidden_act, hp.embedding_scale, hp.query_pre_attn_scalar) == ("gelu_tanh", 8.0, 16.0)
    assert hp.qk_norm and hp.sandwich_norm and hp.sliding_window == 8 and hp.rope_local_theta == 10000.0
    assert hp.layer_types == (SLIDING,) * 5 + (FULL,) and hp.rope_theta == 1e6
    sd = load_file(str(tiny_gemma3 / "model.safetensors"))
    stored = sd["model.layers.2.self_attn.k_norm.weight"]
    assert np.array_equal(ir.tensors["blk.2.attn_k_norm"], stored + np.float32(1))
    assert np.array_equal(ir.tensors["blk.2.ffn_norm"], sd["model.layers.2.pre_feedforward_layernorm.weight"] + 1)
    tok = ir.tokenizer
    assert tok.model == "llama" and tok.add_space_prefix is False and len(tok.scores) == len(tok.tokens)
    assert tok.token_types[tok.tokens.index("<0x0A>")] == 6 and tok.token_types[3] == 2  # byte, unknown
    assert hp.to_json()["layer_types"][-1] == FULL and type(hp).from_json(hp.to_json()) == hp


def test_older_config_keys(tiny_gemma3, tmp_path):
    def old(cfg):
        cfg.pop("layer_types")
        cfg.pop("rope_parameters")
        cfg.update(rope_theta=500000.0, rope_local_base_freq=20000.0, sliding_window_pattern=3)

    hp = load_model(_copy_with(tiny_gemma3, tmp_path / "old", old)).hparams
    assert hp.rope_theta == 500000.0 and hp.rope_local_theta == 20000.0
    assert hp.layer_types == (SLIDING, SLIDING, FULL) * 2


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (lambda c: c.update(hidden_activation="gelu"), "activation 'gelu' is not supported"),
    (lambda c: c.update(use_bidirectional_attention=True), "bidirectional"),
    (lambda c: c["rope_parameters"]["full_attention"].update(rope_type="linear", factor=8.0), "rope_scaling 'linear'"),
])
def test_refused_configs(tiny_gemma3, tmp_path, edit, words):
    with pytest.raises(EdgeqError, match=words):
        load_model(_copy_with(tiny_gemma3, tmp_path / "m", edit))


def test_llama_manifest_hparams_unchanged(tiny_llama):
    d = load_model(tiny_llama).hparams.to_json()
    assert set(d) == {"arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                      "tie_word_embeddings", "attention_bias"}
    assert load_model(tiny_llama).hparams.special_blocks() == ()

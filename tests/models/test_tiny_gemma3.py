"""models/tiny_gemma3.py: the tiny random Gemma 3 checkpoint and its SentencePiece-style tokenizer."""
from __future__ import annotations

import json

import numpy as np

from models import MARKER
from models.tiny_gemma3 import GEMMA_SPECIALS, NUM_LAYERS, SLIDING_WINDOW, make_tiny_gemma3

TEXT = "Hello world! It's 2024, Café ☕ and the robot counted 7 boats.\n  def f(x): return x * 2"


def test_deterministic_files(tmp_path, tiny_gemma3):
    again = make_tiny_gemma3(tmp_path / "again", seed=0)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER):
        assert (again / name).read_bytes() == (tiny_gemma3 / name).read_bytes(), name


def test_config_is_gemma3_with_both_layer_kinds(tiny_gemma3):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(tiny_gemma3)
    assert cfg.model_type == "gemma3_text" and cfg.architectures == ["Gemma3ForCausalLM"]
    assert cfg.num_hidden_layers == NUM_LAYERS and cfg.sliding_window == SLIDING_WINDOW
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg.tie_word_embeddings and cfg.hidden_activation == "gelu_pytorch_tanh"


def test_norms_are_stored_as_w_minus_one(tiny_gemma3):
    from safetensors.numpy import load_file

    sd = load_file(str(tiny_gemma3 / "model.safetensors"))
    norms = np.concatenate([v for k, v in sd.items() if k.endswith("norm.weight")])
    assert abs(float(norms.mean())) < 0.02 and 0.05 < float(norms.std()) < 0.2


def test_tokenizer_is_spm_style_and_transformers_agrees(tiny_gemma3):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tj = json.loads((tiny_gemma3 / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["model"]["type"] == "BPE" and tj["model"]["byte_fallback"] is True
    raw = Tokenizer.from_file(str(tiny_gemma3 / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(tiny_gemma3))
    ids = raw.encode(TEXT).ids
    assert ids == hf(TEXT).input_ids and ids[0] == 2  # <bos> prepended
    assert raw.token_to_id("<0xE2>") is not None and raw.token_to_id("<0xE2>") in ids  # ☕ by byte fallback
    assert hf.decode(ids, skip_special_tokens=True) == TEXT
    assert [raw.token_to_id(t) for t in GEMMA_SPECIALS] == list(range(len(GEMMA_SPECIALS)))
    assert hf.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  tokenize=False) == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"

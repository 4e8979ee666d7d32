"""models/tiny.py: tiny random checkpoints, their tokenizer and random LoRA adapters."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import torch
import transformers
import peft

from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from models import MARKER  # noqa: E402
from models.tiny import (  # noqa: E402
    HEAD_DIM, HIDDEN, INTERMEDIATE, LORA_TARGETS, NUM_HEADS, NUM_KV_HEADS, NUM_LAYERS, SPECIAL_TOKENS,
    TINY_VOCAB_SIZE, build_tiny_tokenizer, make_random_lora, make_tiny_llama, make_tiny_qwen2)

QUANT_BLOCK = 32
TEXT = "Hello world! It's 2024, and the robot counted 7 boats.\n  def f(x): return x * 2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    llama = make_tiny_llama(root / "llama")
    qwen2 = make_tiny_qwen2(root / "qwen2")
    return {"root": root, "llama": llama, "qwen2": qwen2,
            "llama-lora": make_random_lora(llama, root / "llama-lora"),
            "qwen2-lora": make_random_lora(qwen2, root / "qwen2-lora", r=4, alpha=8)}


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None)  # transformers >= 5
    return float(params["rope_theta"]) if params else float(config.rope_theta)


def _logits(model_dir: Path, ids: list[int]) -> "torch.Tensor":
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loads_with_finite_non_degenerate_logits(tiny, arch):
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny[arch]))
    logits = _logits(tiny[arch], tok(TEXT)["input_ids"])
    assert logits.shape[-1] == TINY_VOCAB_SIZE
    assert torch.isfinite(logits).all()
    probs = logits.softmax(-1)
    assert 0.2 < float(logits.std()) < 5.0, "logits should be neither flat nor huge"
    assert float(probs.max()) < 0.9
    # Different positions predict different distributions.
    assert float((logits[1:] - logits[:-1]).abs().max()) > 0.1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shapes_gqa_and_quant_block_multiples(tiny, arch):
    cfg = transformers.AutoConfig.from_pretrained(str(tiny[arch]))
    assert cfg.model_type == arch
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (NUM_LAYERS, HIDDEN, INTERMEDIATE)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    for dim in (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim):
        assert dim % QUANT_BLOCK == 0
    tok = Tokenizer.from_file(str(tiny[arch] / "tokenizer.json"))
    assert cfg.vocab_size == tok.get_vocab_size() == TINY_VOCAB_SIZE
    w = load_file(str(tiny[arch] / "model.safetensors"))
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (NUM_KV_HEADS * HEAD_DIM, HIDDEN)
    assert w["model.layers.1.mlp.down_proj.weight"].shape == (HIDDEN, INTERMEDIATE)
    assert all(v.dtype == np.float32 for v in w.values())
    norm = w["model.layers.0.input_layernorm.weight"]
    assert not np.allclose(norm, 1.0), "norm weights should not be all ones"
    assert (tiny[arch] / MARKER).is_file()


def test_llama_settings(tiny):
    cfg = transformers.AutoConfig.from_pretrained(str(tiny["llama"]))
    assert _rope_theta(cfg) == 10000.0
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.tie_word_embeddings is False
    w = load_file(str(tiny["llama"] / "model.safetensors"))
    assert "lm_head.weight" in w
    assert not any(k.endswith(".bias") for k in w)


def test_qwen2_settings(tiny):
    cfg = transformers.AutoConfig.from_pretrained(str(tiny["qwen2"]))
    assert _rope_theta(cfg) == 1_000_000.0
    assert cfg.tie_word_embeddings is True
    w = load_file(str(tiny["qwen2"] / "model.safetensors"))
    assert "lm_head.weight" not in w  # tied: only the embedding is stored
    for layer in range(NUM_LAYERS):
        for proj, size in (("q", NUM_HEADS * HEAD_DIM), ("k", NUM_KV_HEADS * HEAD_DIM), ("v", NUM_KV_HEADS * HEAD_DIM)):
            bias = w[f"model.layers.{layer}.self_attn.{proj}_proj.bias"]
            assert bias.shape == (size,) and np.abs(bias).max() > 0
        assert f"model.layers.{layer}.self_attn.o_proj.bias" not in w


def test_tie_embeddings_option(tmp_path):
    out = make_tiny_llama(tmp_path / "tied", tie_embeddings=True)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))


def test_deterministic_from_seed(tiny, tmp_path):
    again = make_tiny_llama(tmp_path / "again", seed=0)
    other = make_tiny_llama(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again / name).read_bytes() == (tiny["llama"] / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    lora = make_random_lora(again, tmp_path / "again-lora")
    assert (lora / "adapter_model.safetensors").read_bytes() == \
        (tiny["llama-lora"] / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("style", ["gpt2", "qwen2"])
def test_tokenizer_training_is_deterministic(style):
    assert build_tiny_tokenizer(style).to_str() == build_tiny_tokenizer(style).to_str()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_round_trip_and_specials(tiny, arch):
    raw = Tokenizer.from_file(str(tiny[arch] / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny[arch]))
    for idx, token in enumerate(SPECIAL_TOKENS):
        assert raw.token_to_id(token) == idx == hf.convert_tokens_to_ids(token)
    for text in (TEXT, "Ünïcödé — 日本語 🙂\ttabs", "<|im_start|>user\nhi<|im_end|>\n"):
        ids = raw.encode(text).ids
        assert hf(text)["input_ids"] == ids  # transformers and tokenizer.json agree
        assert raw.decode(ids, skip_special_tokens=False).removeprefix("<|endoftext|>") == text
        assert hf.decode(ids, skip_special_tokens=False).removeprefix("<|endoftext|>") == text
    assert len(raw.encode("hello hello hello").ids) < len("hello hello hello")  # merges do work
    ids = raw.encode("hi").ids
    if arch == "llama":  # Llama-style: BOS prepended
        assert ids[0] == hf.bos_token_id == 0
    else:  # Qwen2-style: no BOS
        assert hf.bos_token is None and ids[0] != 0
    assert hf.eos_token_id == 2
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_lora_changes_outputs(tiny):
    from peft import PeftModel

    cfg = json.loads((tiny["llama-lora"] / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (8, 16, "LORA")
    assert sorted(cfg["target_modules"]) == sorted(LORA_TARGETS)
    w = load_file(str(tiny["llama-lora"] / "adapter_model.safetensors"))
    assert len(w) == 2 * len(LORA_TARGETS) * NUM_LAYERS
    assert all(np.abs(v).max() > 0 for v in w.values())  # A and B both non-zero
    for arch in ("llama", "qwen2"):
        ids = transformers.AutoTokenizer.from_pretrained(str(tiny[arch]))(TEXT)["input_ids"]
        base = _logits(tiny[arch], ids)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny[arch]), dtype=torch.float32)
        adapted = PeftModel.from_pretrained(model, str(tiny[f"{arch}-lora"])).eval()
        with torch.no_grad():
            out = adapted(torch.tensor([ids])).logits[0]
        assert torch.isfinite(out).all()
        rel = float((out - base).norm() / base.norm())
        assert 0.01 < rel < 2.0, f"{arch}: LoRA should change the logits noticeably, got {rel:.4f}"


def test_an_out_path_that_is_a_file_is_one_error_line(tmp_path):
    """`python -m models.tiny --out FILE`: one `error:` line naming the path, exit 1, no traceback."""
    import subprocess
    import sys

    f = tmp_path / "a-file"
    f.write_text("x")
    r = subprocess.run([sys.executable, "-m", "models.tiny", "--out", str(f)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and str(f) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and f.read_text() == "x"

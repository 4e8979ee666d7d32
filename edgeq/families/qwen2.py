"""Qwen2 / Qwen2.5: q/k/v biases by default; llama.cpp's ``qwen2`` graph is rope type NEOX
(rotate-half, no Q/K permutation), loads no attn_output bias and needs
``num_heads * head_dim == hidden_size``; its BPE pre-tokenizer (a Split regex) is ``qwen2``."""
from __future__ import annotations

from edgeq.families.base import (
    LLAMA_PEFT_MODULES,
    Family,
    RopeStyle,
    llama_like_gguf_tensors,
    llama_like_hf_tensors,
)
from edgeq.ir import Arch

QWEN2 = Family(
    arch=Arch.QWEN2,
    hf_model_type="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_tensors=llama_like_hf_tensors(LLAMA_PEFT_MODULES),
    hf_ignored_suffixes=("rotary_emb.inv_freq",),
    peft_modules=LLAMA_PEFT_MODULES,
    gguf_arch="qwen2",
    gguf_tensors=llama_like_gguf_tensors(),
    gguf_rope=RopeStyle.ROTATE_HALF,
    gguf_loads_o_bias=False,
    gguf_needs_full_heads=True,
    attention_bias=True,
    split_pre_tokenizer="qwen2",
)

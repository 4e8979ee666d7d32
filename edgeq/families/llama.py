"""Llama (Llama 2/3, SmolLM2, ...): no biases by default, untied embeddings by default; llama.cpp's
``llama`` graph pairs RoPE dimensions (rope type NORM), so Q/K rows are permuted into GGUF."""
from __future__ import annotations

from edgeq.families.base import (
    LLAMA_PEFT_MODULES,
    Family,
    RopeStyle,
    llama_like_gguf_tensors,
    llama_like_hf_tensors,
)
from edgeq.ir import Arch

LLAMA = Family(
    arch=Arch.LLAMA,
    hf_model_type="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_tensors=llama_like_hf_tensors(LLAMA_PEFT_MODULES),
    hf_ignored_suffixes=("rotary_emb.inv_freq",),
    peft_modules=LLAMA_PEFT_MODULES,
    gguf_arch="llama",
    gguf_tensors=llama_like_gguf_tensors(),
    gguf_rope=RopeStyle.INTERLEAVED,
    gguf_loads_o_bias=True,
    gguf_needs_full_heads=False,
)

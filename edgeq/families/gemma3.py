"""Gemma 3 (text): GeGLU MLP (tanh-GELU), ``(1 + w)`` RMSNorm in checkpoints (GGUF stores the
effective ``1 + w``), per-head QK-norm, sandwich norms around attention and MLP, embeddings scaled
by sqrt(hidden), queries scaled by ``query_pre_attn_scalar``, and sliding-window layers (local RoPE
base) interleaved with global ones. llama.cpp's ``gemma3`` graph is rope type NEOX (rotate-half,
no Q/K permutation); it hard-wires every 6th layer global and the local RoPE base 10000."""
from __future__ import annotations

from edgeq.families.base import LLAMA_PEFT_MODULES, LINEAR_ROLES, Family, RopeStyle, llama_like_hf_tensors
from edgeq.ir import Arch


def _hf_tensors() -> dict[str, str]:
    out = llama_like_hf_tensors(LLAMA_PEFT_MODULES)
    out.update({
        "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.post_attention_norm",
        "model.layers.{bid}.pre_feedforward_layernorm.weight": "blk.{bid}.ffn_norm",
        "model.layers.{bid}.post_feedforward_layernorm.weight": "blk.{bid}.post_ffw_norm",
        "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm",
        "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm",
    })
    return out


def _gguf_tensors() -> dict[str, str]:
    """gguf-py's ``MODEL_TENSORS[GEMMA3]`` names; per block in the order the forward uses them."""
    out = {"token_embd": "token_embd.weight"}
    block = ["attn_norm", "attn_q", "attn_q_norm", "attn_k", "attn_k_norm", "attn_v", "attn_output",
             "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm"]
    linear = {r.value for r in LINEAR_ROLES}
    for name in block:
        out[f"blk.{{bid}}.{name}"] = f"blk.{{bid}}.{name}.weight"
        if name in linear:
            out[f"blk.{{bid}}.{name}.bias"] = f"blk.{{bid}}.{name}.bias"
    out["output_norm"] = "output_norm.weight"
    out["output"] = "output.weight"
    return out


GEMMA3 = Family(
    arch=Arch.GEMMA3,
    hf_model_type="gemma3_text",
    hf_architectures=("Gemma3ForCausalLM",),
    hf_tensors=_hf_tensors(),
    hf_ignored_suffixes=("rotary_emb.inv_freq", "rotary_emb_local.inv_freq"),
    peft_modules=LLAMA_PEFT_MODULES,
    gguf_arch="gemma3",
    gguf_tensors=_gguf_tensors(),
    gguf_rope=RopeStyle.ROTATE_HALF,
    gguf_loads_o_bias=False,
    gguf_needs_full_heads=False,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    hf_norm_offset=1.0,
    hf_activations={"gelu_pytorch_tanh": "gelu_tanh"},
    scaled_embedding=True,
    query_scalar=True,
    qk_norm=True,
    sandwich_norm=True,
    sliding_window=True,
    gguf_swa_pattern=6,
    gguf_rope_local_theta=10_000.0,
)

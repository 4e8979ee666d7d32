"""Gemma 3 (text): GeGLU MLP (tanh-GELU), ``(1 + w)`` RMSNorm in checkpoints (GGUF stores the
effective ``1 + w``), per-head QK-norm, sandwich norms around attention and MLP, embeddings scaled
by sqrt(hidden), queries scaled by ``query_pre_attn_scalar``, and sliding-window layers (local RoPE
base) interleaved with global ones. llama.cpp's ``gemma3`` graph is rope type NEOX (rotate-half,
no Q/K permutation); it hard-wires every 6th layer global and the local RoPE base 10000.

Per-layer MLP widths have no GGUF form (``gguf_rates_refusal``; a GGUF rate keeps one MLP width in
every layer, edgeq.backends.gguf.rates.gguf_prune_spec; llama.cpp as vendored by llama-cpp-python 0.3.36): ``llama_model::load_hparams`` reads
``gemma3.feed_forward_length`` as a scalar or a per-layer array (``get_key_or_arr`` into
``hparams.n_ff_arr``, src/llama-model.cpp:1395), but ``llama_model_gemma3::load_arch_tensors``
creates every layer's ``ffn_gate`` / ``ffn_up`` / ``ffn_down`` with the one ``n_ff`` of
``LLAMA_LOAD_LOCALS`` (``hparams.n_ff()`` = layer 0's, src/llama-model.h:871;
src/models/gemma3.cpp:66-68), so any other layer width fails the loader's shape check
(src/llama-model-loader.cpp:917, "has wrong shape"). Its ``build_ffn`` takes no ``ffn_down`` bias
(src/models/gemma3.cpp:177-182; an extra tensor fails "wrong number of tensors",
src/llama-model-loader.cpp:1398), so bias compensation has no place either. The architectures that
do create per-layer widths (``hparams.n_ff(il)``) compute other blocks: ``deci`` the Llama forward,
``gemma4`` (src/models/gemma4.cpp:101-107) RMS-normalises V without a weight
(src/models/gemma4.cpp:257), which no Gemma 3 weight can undo."""
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
    gguf_rates_refusal=("llama.cpp's gemma3 architecture creates every layer's MLP at layer 0's width "
                        "(n_ff(0)) and loads no ffn_down bias, so one GGUF cannot carry per-layer MLP widths, "
                        "and 'deci' (which can) computes none of Gemma 3's blocks"),
)

"""What a model family is: the facts the front ends and backends need, as one frozen table.

A family (Llama, Qwen2, ...) is a :class:`Family`: its Hugging Face names (``model_type``,
architecture classes, checkpoint tensor names), its GGUF names (``general.architecture``,
tensor names), its norm and RoPE conventions, its bias and tying defaults, its PEFT target
modules and its llama.cpp pre-tokenizer naming. ``edgeq.frontend`` (hf, peft, tokenizer) and
``edgeq.backends.gguf`` read these tables instead of testing ``arch == ...``; adding a family is
a new table file plus an :class:`edgeq.ir.Arch` member (docs/architecture.md, "Adding a model
family"). Tensor-name patterns hold ``{bid}`` for the block (layer) index.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

import numpy as np

from edgeq.ir import Arch, Role


class RopeStyle(str, Enum):
    """Which dimensions of a head RoPE rotates together."""

    ROTATE_HALF = "rotate-half"  # (j, j + d/2): Hugging Face; llama.cpp rope type NEOX
    INTERLEAVED = "interleaved"  # (2j, 2j+1): llama.cpp rope type NORM (the ``llama`` arch)


class NormKind(str, Enum):
    RMS = "rms"  # x / sqrt(mean(x^2) + eps) * w


# the block linears, in the order every writer lays them out
LINEAR_ROLES: tuple[Role, ...] = (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)


@dataclass(frozen=True)
class Family:
    arch: Arch
    # --- Hugging Face
    hf_model_type: str  # config.json "model_type"
    hf_architectures: tuple[str, ...]  # config.json "architectures" / PEFT base_model_class
    hf_tensors: Mapping[str, str]  # checkpoint tensor name -> IR name ({bid} patterns)
    hf_ignored_suffixes: tuple[str, ...]  # checkpoint tensors that carry no weights (skipped)
    peft_modules: Mapping[str, Role]  # PEFT target_modules name -> linear role
    # --- GGUF / llama.cpp
    gguf_arch: str  # general.architecture
    gguf_tensors: Mapping[str, str]  # IR name -> GGUF tensor name ({bid} patterns), in file order
    gguf_rope: RopeStyle  # how llama.cpp's graph for gguf_arch pairs RoPE dimensions
    gguf_loads_o_bias: bool  # llama.cpp's graph for gguf_arch loads an attn_output bias
    gguf_needs_full_heads: bool  # llama.cpp's gguf_arch needs num_heads * head_dim == hidden_size
    # --- conventions and defaults
    norm: NormKind = NormKind.RMS
    hf_rope: RopeStyle = RopeStyle.ROTATE_HALF  # the order of Q/K rows in HF checkpoints
    attention_bias: bool = False  # q/k/v biases when config.json does not say
    tie_word_embeddings: bool = False  # when config.json does not say
    rope_theta: float = 10000.0  # when config.json does not say
    rms_norm_eps: float = 1e-6  # when config.json does not say
    # llama.cpp tokenizer.ggml.pre for a byte-level BPE whose pre-tokenizer has a Split regex
    # (None: the generic naming of edgeq.frontend.tokenizer applies)
    split_pre_tokenizer: str | None = None
    # --- the family's special blocks (defaults: the Llama forward); see edgeq.ir.HParams
    hf_norm_offset: float = 0.0  # checkpoints store norm weights minus this (Gemma: 1, "(1 + w)")
    # config.json hidden_act(ivation) -> HParams.hidden_act; the first is the family's (and GGUF's)
    hf_activations: Mapping[str, str] = field(default_factory=lambda: {"silu": "silu"})
    scaled_embedding: bool = False  # embeddings multiplied by float32(sqrt(hidden_size))
    # config.json's query_pre_attn_scalar sets the attention scale (llama.cpp: head_dim, but 27B)
    query_scalar: bool = False
    qk_norm: bool = False  # per-head RMSNorm of Q and K (q_norm / k_norm)
    sandwich_norm: bool = False  # RMSNorm of the attention and MLP outputs (post_*_norm)
    sliding_window: bool = False  # config.json sliding_window / layer_types are honoured
    # llama.cpp's graph for gguf_arch: which layers are global (every n-th; None: all) and the
    # RoPE base of the sliding ones (both hard-wired there, not read from the GGUF)
    gguf_swa_pattern: int | None = None
    gguf_rope_local_theta: float | None = None
    # why no llama.cpp architecture runs this family's blocks with per-layer MLP widths, so that the
    # gguf format cannot lower its structured pruning (one GGUF per rate, edgeq.backends.gguf.rates);
    # None: the Llama forward's families, written as llama.cpp's 'deci' at a rate
    gguf_rates_refusal: str | None = None
    _hf_res: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        res = tuple((_pattern_re(k), v) for k, v in self.hf_tensors.items())
        object.__setattr__(self, "_hf_res", res)

    @property
    def gguf_permute_qk(self) -> bool:
        """Q/K rows (and biases, LoRA B) are permuted per head on the way into GGUF
        (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``) when the HF order differs from
        llama.cpp's."""
        return self.hf_rope != self.gguf_rope

    def gguf_block_hparams(self, hidden_size: int, num_layers: int, head_dim: int,
                           sliding_window: int | None) -> dict:
        """The HParams fields of the family's special blocks as llama.cpp's graph for
        ``gguf_arch`` runs them (what a GGUF of this family means; what one must match)."""
        from edgeq.ir import FULL, SLIDING  # noqa: PLC0415 - ir is below families; keep the import local

        out: dict = {"hidden_act": next(iter(self.hf_activations.values())),
                     "embedding_scale": float(np.float32(np.sqrt(hidden_size))) if self.scaled_embedding else 1.0,
                     "query_pre_attn_scalar": float(head_dim) if self.query_scalar else None,
                     "qk_norm": self.qk_norm, "sandwich_norm": self.sandwich_norm,
                     "sliding_window": None, "layer_types": None, "rope_local_theta": None}
        if self.sliding_window and sliding_window:
            n = self.gguf_swa_pattern or num_layers + 1
            out.update(sliding_window=int(sliding_window), rope_local_theta=self.gguf_rope_local_theta,
                       layer_types=tuple(FULL if (i + 1) % n == 0 else SLIDING for i in range(num_layers)))
        return out

    def ir_name_of_hf(self, key: str) -> str | None:
        """IR name of a checkpoint tensor (``model.layers.3.self_attn.q_proj.weight`` ->
        ``blk.3.attn_q``); None when the table has no entry for it."""
        for rx, ir_pat in self._hf_res:
            m = rx.match(key)
            if m:
                return ir_pat.format(**m.groupdict())
        return None

    def hf_is_ignored(self, key: str) -> bool:
        return key.endswith(self.hf_ignored_suffixes)


def _pattern_re(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{bid\}", r"(?P<bid>\d+)") + "$")


def llama_like_hf_tensors(modules: Mapping[str, Role]) -> dict[str, str]:
    """The Llama checkpoint layout (Llama, Qwen2, Mistral ...): embeddings, per-layer
    ``self_attn``/``mlp`` linears (weights and optional biases), two RMS norms, final norm,
    ``lm_head``."""
    attn = {Role.Q, Role.K, Role.V, Role.O}
    out = {"model.embed_tokens.weight": "token_embd"}
    for module, role in modules.items():
        sub = "self_attn" if role in attn else "mlp"
        for kind, suffix in (("weight", ""), ("bias", ".bias")):
            out[f"model.layers.{{bid}}.{sub}.{module}.{kind}"] = f"blk.{{bid}}.{role.value}{suffix}"
    out["model.layers.{bid}.input_layernorm.weight"] = "blk.{bid}.attn_norm"
    out["model.layers.{bid}.post_attention_layernorm.weight"] = "blk.{bid}.ffn_norm"
    out["model.norm.weight"] = "output_norm"
    out["lm_head.weight"] = "output"
    return out


def llama_like_gguf_tensors() -> dict[str, str]:
    """llama.cpp's tensor names for the Llama layout (gguf-py ``MODEL_TENSORS``), in the order
    ``convert_hf_to_gguf.py`` writes them: embeddings, per block the attention norm, the
    linears (each followed by its bias), the FFN norm; then the final norm and the head."""
    out = {"token_embd": "token_embd.weight", "blk.{bid}.attn_norm": "blk.{bid}.attn_norm.weight"}
    for role in LINEAR_ROLES:
        out[f"blk.{{bid}}.{role.value}"] = f"blk.{{bid}}.{role.value}.weight"
        out[f"blk.{{bid}}.{role.value}.bias"] = f"blk.{{bid}}.{role.value}.bias"
    out["blk.{bid}.ffn_norm"] = "blk.{bid}.ffn_norm.weight"
    out["output_norm"] = "output_norm.weight"
    out["output"] = "output.weight"
    return out


LLAMA_PEFT_MODULES: dict[str, Role] = {
    "q_proj": Role.Q, "k_proj": Role.K, "v_proj": Role.V, "o_proj": Role.O,
    "gate_proj": Role.GATE, "up_proj": Role.UP, "down_proj": Role.DOWN,
}

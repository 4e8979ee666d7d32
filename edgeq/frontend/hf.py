"""Hugging Face checkpoint directory (Llama / Qwen2) -> ModelIR. numpy only."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.frontend.jsonfile import read_json
from edgeq.frontend.safetensors_io import checkpoint_files, lazy_safetensors
from edgeq.frontend.tokenizer import load_tokenizer_spec
from edgeq.hashing import sha256_file
from edgeq.lazy import is_lazy
from edgeq.ir import HF_MODULE_ROLE, Arch, HParams, Linear, ModelIR, linear_name

SUPPORTED = {"llama": Arch.LLAMA, "qwen2": Arch.QWEN2}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_NORM_RE = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")


def read_config(model_dir: Path) -> dict:
    return read_json(model_dir / "config.json",
                     missing=f"{model_dir}: no config.json (expected a Hugging Face checkpoint directory)")


def hparams_from_config(cfg: dict, where: Path) -> HParams:
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise EdgeqError(f"{where}: unknown architecture {mt!r} (supported: {', '.join(SUPPORTED)})")
    # transformers >= 5 writes rope settings under "rope_parameters"; older ones use
    # "rope_theta" + "rope_scaling"
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or rope
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise EdgeqError(f"{where}: rope_scaling {scaling.get('rope_type') or scaling.get('type')!r} "
                         "is not supported yet")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return HParams(
            arch=SUPPORTED[mt],
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", mt == "qwen2")),
        )
    except KeyError as exc:
        raise EdgeqError(f"{where}/config.json: missing field {exc.args[0]!r}") from None


def load_hf(model_dir: str | Path) -> ModelIR:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EdgeqError(f"{model_dir}: not a directory")
    cfg = read_config(model_dir)
    hp = hparams_from_config(cfg, model_dir)
    files = checkpoint_files(model_dir)
    raw: dict[str, np.ndarray] = {}
    for f in files:
        raw.update(lazy_safetensors(f))
    weights: dict[str, np.ndarray] = {}
    biases: dict[str, np.ndarray] = {}
    tensors: dict[str, np.ndarray] = {}
    for key, arr in raw.items():
        if m := _LAYER_RE.match(key):
            layer, _, module, kind = m.groups()
            role = HF_MODULE_ROLE.get(module)
            if role is None:
                raise EdgeqError(f"{model_dir}: unexpected tensor {key}")
            (weights if kind == "weight" else biases)[linear_name(int(layer), role)] = arr
        elif m := _NORM_RE.match(key):
            layer, which = m.groups()
            tensors[f"blk.{layer}.{'attn_norm' if which == 'input_layernorm' else 'ffn_norm'}"] = arr
        elif key == "model.embed_tokens.weight":
            tensors["token_embd"] = arr
        elif key == "model.norm.weight":
            tensors["output_norm"] = arr
        elif key == "lm_head.weight":
            if not hp.tie_word_embeddings:
                tensors["output"] = arr
        elif key.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise EdgeqError(f"{model_dir}: unexpected tensor {key} for architecture {hp.arch.value}")
    linears = {}
    for name, w in sorted(weights.items()):
        layer, role_s = name.split(".")[1:]
        role = next(r for r in HF_MODULE_ROLE.values() if r.value == role_s)
        linears[name] = Linear(name=name, role=role, layer=int(layer),
                               weight=w if is_lazy(w) else np.ascontiguousarray(w, dtype=np.float32),
                               bias=biases.get(name))
    tokenizer = load_tokenizer_spec(model_dir, hp.arch.value)
    source = {
        "kind": "hf",
        "path": str(model_dir),
        "files": {f.name: sha256_file(f) for f in sorted(files + [model_dir / "config.json", model_dir / "tokenizer.json"])},
    }
    ir = ModelIR(hparams=hp, linears=linears, tensors=tensors, tokenizer=tokenizer, source=source)
    ir.validate()
    return ir

"""Hugging Face checkpoint directory -> ModelIR, for the families of :mod:`edgeq.families`. numpy only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.families import by_hf_model_type, family, hf_model_types
from edgeq.frontend.jsonfile import read_json
from edgeq.frontend.safetensors_io import checkpoint_files, lazy_safetensors
from edgeq.frontend.tokenizer import load_tokenizer_spec
from edgeq.hashing import sha256_file
from edgeq.lazy import is_lazy
from edgeq.ir import FULL, SLIDING, HParams, Linear, ModelIR, Role


def read_config(model_dir: Path) -> dict:
    return read_json(model_dir / "config.json",
                     missing=f"{model_dir}: no config.json (expected a Hugging Face checkpoint directory)")


def _rope_settings(cfg: dict, where: Path) -> tuple[dict, dict]:
    """(global, local) rope settings: transformers >= 5 writes them under "rope_parameters"
    (per layer type for sliding-window families), older ones use "rope_theta" + "rope_scaling"
    (+ "rope_local_base_freq"). Unsupported rope scaling is refused."""
    rope = cfg.get("rope_parameters") or {}
    per_type = any(isinstance(rope.get(k), dict) for k in (FULL, SLIDING))
    full, local = (rope.get(FULL) or {}, rope.get(SLIDING) or {}) if per_type else (rope, {})
    for scaling in (cfg.get("rope_scaling") or full, local):
        if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
            raise EdgeqError(f"{where}: rope_scaling {scaling.get('rope_type') or scaling.get('type')!r} "
                             "is not supported yet")
    return full, local


def _family_blocks(cfg: dict, fam, hidden: int, n_layers: int, local: dict, where: Path) -> dict:
    """The HParams fields of the family's special blocks (edgeq.ir.HParams), from config.json."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if act is not None and act not in fam.hf_activations:
        raise EdgeqError(f"{where}: activation {act!r} is not supported for {fam.hf_model_type} "
                         f"(supported: {', '.join(fam.hf_activations)})")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise EdgeqError(f"{where}: {key} {cfg[key]} is not supported yet")
    if cfg.get("use_bidirectional_attention"):
        raise EdgeqError(f"{where}: bidirectional attention is not supported")
    out: dict = {"hidden_act": fam.hf_activations[act] if act else next(iter(fam.hf_activations.values()))}
    if fam.scaled_embedding:
        out["embedding_scale"] = float(np.float32(np.sqrt(hidden)))  # as transformers' float32 buffer
    if cfg.get("query_pre_attn_scalar") is not None:
        out["query_pre_attn_scalar"] = float(cfg["query_pre_attn_scalar"])
    out["qk_norm"], out["sandwich_norm"] = fam.qk_norm, fam.sandwich_norm
    if fam.sliding_window and cfg.get("sliding_window"):
        types = cfg.get("layer_types")
        if types is None:  # older configs: every n-th layer global
            n = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
                    or fam.gguf_swa_pattern or 1)
            types = [FULL if (i + 1) % n == 0 else SLIDING for i in range(n_layers)]
        out["layer_types"] = tuple(str(t) for t in types)
        out["sliding_window"] = int(cfg["sliding_window"])
        out["rope_local_theta"] = float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
    return out


def hparams_from_config(cfg: dict, where: Path) -> HParams:
    mt = cfg.get("model_type")
    fam = by_hf_model_type(mt)
    if fam is None:
        raise EdgeqError(f"{where}: unknown architecture {mt!r} (supported: {', '.join(hf_model_types())})")
    full, local = _rope_settings(cfg, where)
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        n_layers = int(cfg["num_hidden_layers"])
        return HParams(
            arch=fam.arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rope_theta=float(full.get("rope_theta", cfg.get("rope_theta", fam.rope_theta))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", fam.rms_norm_eps)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", fam.tie_word_embeddings)),
            attention_bias=bool(cfg.get("attention_bias", fam.attention_bias)),
            **_family_blocks(cfg, fam, hidden, n_layers, local, where),
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
    fam = family(hp.arch)
    roles = {r.value: r for r in Role}
    for key, arr in raw.items():
        ir_name = fam.ir_name_of_hf(key)
        if ir_name is None:
            if fam.hf_is_ignored(key):
                continue
            raise EdgeqError(f"{model_dir}: unexpected tensor {key} for architecture {hp.arch.value}")
        if ir_name == "output" and hp.tie_word_embeddings:
            continue
        parts = ir_name.split(".")
        if len(parts) >= 3 and parts[2] in roles:  # blk.N.<role>[.bias]
            (biases if parts[-1] == "bias" else weights)[".".join(parts[:3])] = arr
        elif ir_name.endswith("norm") and fam.hf_norm_offset:  # stored as w - offset: the IR holds w
            tensors[ir_name] = np.asarray(arr, dtype=np.float32) + np.float32(fam.hf_norm_offset)
        else:
            tensors[ir_name] = arr
    linears = {}
    for name, w in sorted(weights.items()):
        layer, role_s = name.split(".")[1:]
        linears[name] = Linear(name=name, role=roles[role_s], layer=int(layer),
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

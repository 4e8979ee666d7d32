"""Hugging Face tokenizer files -> TokenizerSpec (no torch, no transformers)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.families import family
from edgeq.frontend.jsonfile import read_json
from edgeq.ir import TOKENIZER_BPE, TOKENIZER_SPM, TokenizerSpec

# llama.cpp token types
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 3, 4, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")


def _token_id(tok: dict, cfg: dict, key: str) -> int | None:
    v = cfg.get(key)
    if isinstance(v, dict):
        v = v.get("content")
    if v is None:
        return None
    vocab = tok["model"]["vocab"]
    if v in vocab:
        return int(vocab[v])
    for added in tok.get("added_tokens", []):
        if added["content"] == v:
            return int(added["id"])
    return None


def _pre_name(tok: dict, arch: str) -> str:
    """llama.cpp's pre-tokenizer name, from the structure of the HF pre-tokenizer."""
    pre = tok.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [])] if pre.get("type") == "Sequence" else [pre.get("type")]
    split_name = family(arch).split_pre_tokenizer
    if split_name is not None and "Split" in kinds:
        return split_name
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"  # SmolLM/StarCoder family: individual digits, then byte level
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    return "default"


def load_tokenizer_spec(model_dir: Path, arch: str) -> TokenizerSpec:
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.exists():
        raise EdgeqError(f"{model_dir}: no tokenizer.json (a fast Hugging Face tokenizer is required)")
    text = tj_path.read_text(encoding="utf-8")
    try:
        tok = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"{tj_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = read_json(cfg_path) if cfg_path.exists() else {}
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise EdgeqError(f"{tj_path}: unsupported tokenizer model {model.get('type')!r} (supported: BPE)")
    byte_level = "ByteLevel" in json.dumps(tok.get("pre_tokenizer")) or "ByteLevel" in json.dumps(tok.get("decoder"))
    spm = not byte_level and bool(model.get("byte_fallback"))  # SentencePiece-style BPE (Gemma)
    if not byte_level and not spm:
        raise EdgeqError(f"{tj_path}: only byte-level BPE (GPT-2 style) and SentencePiece-style BPE "
                         "(byte fallback) tokenizers are supported for now")
    vocab: dict[str, int] = dict(model["vocab"])
    types: dict[int, int] = {i: TOKEN_NORMAL for i in vocab.values()}
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = int(added["id"])
        types[int(added["id"])] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for s, i in vocab.items():
        tokens[i] = s
    for i in range(n):
        if not tokens[i]:
            tokens[i] = f"[PAD{i}]"
            types[i] = TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    scores = None
    if spm:
        scores, types = _spm_scores_and_types(tokens, types, merges, model.get("unk_token"))
    chat_template = cfg.get("chat_template")
    if isinstance(chat_template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in chat_template}
        chat_template = named.get("default") or next(iter(named.values()), None)
    if chat_template is None and (model_dir / "chat_template.jinja").exists():
        chat_template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return TokenizerSpec(
        tokenizer_json=text,
        model=TOKENIZER_SPM if spm else TOKENIZER_BPE,
        pre="default" if spm else _pre_name(tok, arch),
        tokens=tuple(tokens),
        token_types=tuple(types[i] for i in range(n)),
        merges=() if spm else tuple(merges),
        bos_id=_token_id(tok, cfg, "bos_token"),
        eos_id=_token_id(tok, cfg, "eos_token"),
        pad_id=_token_id(tok, cfg, "pad_token"),
        unk_id=_token_id(tok, cfg, "unk_token"),
        add_bos=bool(cfg.get("add_bos_token", False)),
        chat_template=chat_template,
        scores=scores,
        add_space_prefix=_prepends_space(tok) if spm else None,
    )


def _spm_scores_and_types(tokens: list[str], types: dict[int, int], merges: list[str],
                          unk: str | None) -> tuple[tuple[float, ...], dict[int, int]]:
    """llama.cpp's view of a SentencePiece-style BPE: a score per token (its merge's rank,
    negated: llama.cpp merges the highest-scoring pair first, HF the lowest-ranked merge) and
    the byte-fallback tokens ``<0xXX>`` typed BYTE, the unknown token UNKNOWN."""
    index = {t: i for i, t in enumerate(tokens)}
    scores = [0.0] * len(tokens)
    done = set()
    for rank, m in enumerate(merges):
        merged = m.replace(" ", "", 1)
        i = index.get(merged)
        if i is not None and i not in done:
            scores[i] = -float(rank + 1)
            done.add(i)
    types = dict(types)
    for i, t in enumerate(tokens):
        if types[i] == TOKEN_NORMAL and _BYTE_TOKEN.match(t):
            types[i] = TOKEN_BYTE
        elif unk is not None and t == unk:
            types[i] = TOKEN_UNKNOWN
    return tuple(scores), types


def _prepends_space(tok: dict) -> bool:
    """Whether the tokenizer puts a "▁" before the text (a Prepend normalizer or a Metaspace
    that prepends): llama.cpp's ``add_space_prefix``."""
    parts = [tok.get("normalizer") or {}, tok.get("pre_tokenizer") or {}]
    flat = []
    while parts:
        p = parts.pop()
        flat.append(p)
        parts.extend(p.get("normalizers", []) + p.get("pretokenizers", []))
    return any(p.get("type") == "Prepend" or (p.get("type") == "Metaspace" and p.get("prepend_scheme") in
                                                 ("first", "always")) for p in flat)

"""Tokenizer metadata of a model GGUF: ``tokenizer.ggml.*`` from a TokenizerSpec, and back (with
a reconstructed HF tokenizer.json for the byte-level BPE pre-tokenizers llama.cpp names)."""
from __future__ import annotations

import json
from typing import Any

from edgeq.ir import TOKENIZER_SPM, TokenizerSpec

# tokenizer.ggml.pre values llama.cpp (llama-vocab.cpp) accepts for BPE vocabularies that our
# front end produces. "default" and "gpt-2" are generic byte-level BPE pre-tokenizers.
KNOWN_PRE = frozenset({
    "default", "gpt-2", "smollm", "qwen2", "llama3", "llama-bpe", "starcoder", "refact", "olmo",
    "dbrx", "smaug-bpe", "deepseek-llm", "deepseek-coder", "falcon", "mpt", "jina-v2-code",
})


# llama.cpp token type "unused", for padding the vocabulary up to the embedding rows
_TOKEN_UNUSED = 5


def _padded_vocab(tok: TokenizerSpec, n_vocab: int) -> tuple[list[str], list[int]]:
    tokens = list(tok.tokens)
    types = [int(t) for t in tok.token_types]
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(_TOKEN_UNUSED)
    return tokens, types


def write_tokenizer(w, tok: TokenizerSpec, n_vocab: int) -> None:
    tokens, types = _padded_vocab(tok, n_vocab)
    w.add_tokenizer_model(tok.model)
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tokens)
    if tok.scores is not None:  # SentencePiece-style: llama.cpp merges by these
        w.add_token_scores([float(x) for x in tok.scores] + [0.0] * (len(tokens) - len(tok.scores)))
    w.add_token_types(types)
    if tok.merges:
        w.add_token_merges(list(tok.merges))
    if tok.bos_id is not None:
        w.add_bos_token_id(int(tok.bos_id))
    if tok.eos_id is not None:
        w.add_eos_token_id(int(tok.eos_id))
    if tok.unk_id is not None:
        w.add_unk_token_id(int(tok.unk_id))
    if tok.pad_id is not None:
        w.add_pad_token_id(int(tok.pad_id))
    w.add_add_bos_token(bool(tok.add_bos))
    if tok.add_space_prefix is not None:
        w.add_add_space_prefix(bool(tok.add_space_prefix))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)



_PRE_TOKENIZERS: dict[str, Any] = {
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "default": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
}


def _tokenizer_json(model: str, pre: str, tokens: list[str], types: list[int], merges: list[str]) -> str:
    """Best-effort HF tokenizer.json for a byte-level BPE vocabulary; "" when the pre-tokenizer
    is not one we can reproduce."""
    if model != "gpt2" or pre not in _PRE_TOKENIZERS:
        return ""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != _TOKEN_UNUSED}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3}
             for i, t in enumerate(tokens) if types[i] in (3, 4)]
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if pre == "qwen2" else None,
        "pre_tokenizer": _PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": [m.split(" ", 1) for m in merges]},
    }
    return json.dumps(doc, ensure_ascii=False)


def _spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[list[str]]:
    """BPE merges that reproduce llama.cpp's SentencePiece merging: every split of a normal
    token into two vocabulary pieces, ranked by the merged token's score (highest first)."""
    index = {t: i for i, t in enumerate(tokens)}
    found = []
    for i, t in enumerate(tokens):
        if types[i] != 1 or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = index.get(t[:k]), index.get(t[k:])
            if a is not None and b is not None:
                found.append((-scores[i], i, a, b))
    found.sort()
    return [[tokens[a], tokens[b]] for _, _, a, b in found]


def _spm_tokenizer_json(tokens: list[str], types: list[int], scores: list[float], unk_id: int | None,
                        bos_id: int | None, add_bos: bool, add_space_prefix: bool) -> str:
    """An HF tokenizer.json for a SentencePiece-style vocabulary (``tokenizer.ggml.model = llama``):
    BPE with byte fallback over "▁"-for-space text, merges from the scores (:func:`_spm_merges`),
    control tokens special, user-defined tokens added as written."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != _TOKEN_UNUSED}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == 3}
             for i, t in enumerate(tokens) if types[i] in (3, 4)]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]} \
        if add_space_prefix else replace
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    post = None
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": None, "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": None if unk_id is None else tokens[unk_id],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab,
                  "merges": _spm_merges(tokens, types, scores)},
    }
    return json.dumps(doc, ensure_ascii=False)


def field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def read_tokenizer(reader) -> TokenizerSpec | None:
    tokens = field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        return None
    model = str(field(reader, "tokenizer.ggml.model", "gpt2"))
    pre = str(field(reader, "tokenizer.ggml.pre", "default"))
    types = [int(t) for t in (field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))]
    merges = list(field(reader, "tokenizer.ggml.merges") or [])

    def opt_id(key: str) -> int | None:
        v = field(reader, key)
        return None if v is None else int(v)

    add_bos = field(reader, "tokenizer.ggml.add_bos_token")
    scores = field(reader, "tokenizer.ggml.scores")
    space = field(reader, "tokenizer.ggml.add_space_prefix")
    # drop the [PADi]/unused tail that write_gguf (and convert_hf_to_gguf) append
    n = len(tokens)
    while n > 0 and types[n - 1] == _TOKEN_UNUSED and tokens[n - 1] == f"[PAD{n - 1}]":
        n -= 1
    tokens, types = list(tokens[:n]), types[:n]
    bos_id, unk_id = opt_id("tokenizer.ggml.bos_token_id"), opt_id("tokenizer.ggml.unknown_token_id")
    if model == TOKENIZER_SPM and scores is not None:
        text = _spm_tokenizer_json(tokens, types, [float(x) for x in scores[:n]], unk_id, bos_id,
                                   bool(add_bos), bool(space) if space is not None else True)
    else:
        text = _tokenizer_json(model, pre, tokens, types, merges)
    return TokenizerSpec(
        tokenizer_json=text,
        model=model, pre=pre, tokens=tuple(tokens), token_types=tuple(types), merges=tuple(merges),
        bos_id=bos_id, eos_id=opt_id("tokenizer.ggml.eos_token_id"),
        pad_id=opt_id("tokenizer.ggml.padding_token_id"), unk_id=unk_id,
        add_bos=bool(add_bos) if add_bos is not None else False,
        chat_template=field(reader, "tokenizer.chat_template"),
        scores=None if scores is None else tuple(float(x) for x in scores[:n]),
        add_space_prefix=None if space is None else bool(space),
    )


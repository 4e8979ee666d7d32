"""A SentencePiece-style BPE tokenizer as flat arrays: the ``tokenizer.vocab.safetensors`` of ONNX
and TVM artifacts.

A session used to rebuild the tokenizer from the artifact's JSON spec (the Hugging Face
``tokenizer.json`` text inside it) with the ``tokenizers`` library: for Gemma 3's 262,144-token
vocabulary that is a ~410 MB parse transient and ~320 MB kept by the Rust tokenizer
(docs/benchmarks.md, issue 17), more than the model's weights. This file holds what encoding and
decoding need as arrays a runtime memory-maps (``runtimes.spm_bpe`` reads them: ~20 MB more RSS
after a session's first ``tokenize``, measured):

- ``vocab.bytes`` / ``vocab.offsets``: every token's UTF-8 text, concatenated, and where each starts;
- ``merges.key`` (``left * n + right``, sorted), ``merges.rank``, ``merges.new_id``: the merge table;
- ``chars.codepoint`` (sorted) / ``chars.id``: the vocabulary's one-character tokens, the
  symbols BPE starts from; ``bytes.id``: the ``<0xXX>`` byte-fallback tokens (-1 where absent);
- ``added.id`` / ``added.flags``: the added tokens (bit 0 special, bit 1 matched after
  normalisation, their text then stored normalised, as ``tokenizers`` keeps it), split out of
  the text before BPE;

and in the metadata the normaliser / decoder steps, the post-processor's prefix ids, the special
ids and the chat template. Only the shapes of ``tokenizer.json`` that :mod:`runtimes.spm_bpe`
reproduces exactly are packed (:func:`packable` says why not otherwise); anything else keeps the
``tokenizers`` library path."""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import TOKENIZER_SPM, TokenizerSpec
from edgeq.safetensors_writer import SafetensorsWriter

FORMAT = "edgeq-spm-bpe/1"
VOCAB_FILE = "tokenizer.vocab.safetensors"  # its name in an artifact (manifest: <format>.tokenizer_vocab_file)
EOS_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<end_of_turn>")  # llama.cpp's end-of-generation names
_ARRAYS = {"vocab.bytes": np.uint8, "vocab.offsets": np.int64, "merges.key": np.int64, "merges.rank": np.int32,
           "merges.new_id": np.int32, "chars.codepoint": np.int32, "chars.id": np.int32, "bytes.id": np.int32,
           "added.id": np.int32, "added.flags": np.uint8}


def _steps(node, children: str, leaf) -> list[list] | str:
    """A tokenizer.json normaliser / decoder (``Sequence``s flattened through ``children``) as the
    list of ``leaf(node)`` steps, or the first reason ``leaf`` gives for one it does not support."""
    if node is None:
        return []
    if node.get("type") != "Sequence":
        return leaf(node)
    steps: list = []
    for child in node.get(children, []):
        s = _steps(child, children, leaf)
        if isinstance(s, str):
            return s
        steps += s
    return steps


def _replace(node) -> list[list[str]] | None:
    if node.get("type") == "Replace" and set(node.get("pattern", {})) == {"String"}:
        return [["replace", node["pattern"]["String"], node.get("content", "")]]
    return None


def _normalizer_step(norm) -> list[list[str]] | str:
    if norm.get("type") == "Prepend":
        return [["prepend", norm.get("prepend", "")]]
    return _replace(norm) or f"normalizer {norm.get('type')}"


def _decoder_step(dec) -> list[list] | str:
    kind = dec.get("type")
    if kind in ("ByteFallback", "Fuse"):
        return [[kind.lower()]]
    if kind == "Strip":
        return [["strip", dec.get("content", " "), int(dec.get("start", 0)), int(dec.get("stop", 0))]]
    return _replace(dec) or f"decoder {kind}"


def _normalizer_steps(norm) -> list[list[str]] | str:
    """The normaliser as [["replace", a, b] | ["prepend", s]] steps, or why it is not supported."""
    return _steps(norm, "normalizers", _normalizer_step)


def _decoder_steps(dec) -> list[list] | str:
    """The decoder as replace / bytefallback / fuse / strip steps, or why it is not supported."""
    return _steps(dec, "decoders", _decoder_step)


def _prefix_ids(post) -> list[int] | str:
    """The ids a TemplateProcessing post-processor puts before a single sequence (and none after)."""
    if post is None:
        return []
    if post.get("type") != "TemplateProcessing":
        return f"post-processor {post.get('type')}"
    single = post.get("single", [])
    ids: list[int] = []
    for k, part in enumerate(single):
        if "Sequence" in part:
            if k != len(single) - 1 or part["Sequence"].get("id") != "A":
                return "post-processor with tokens after the sequence"
            continue
        name = part.get("SpecialToken", {}).get("id")
        special = post.get("special_tokens", {}).get(name, {})
        sid = special.get("ids")
        if not isinstance(sid, list) or len(sid) != 1 or not isinstance(sid[0], int):
            return "post-processor special token without one id"
        ids.append(int(sid[0]))
    return ids


def packable(spec: TokenizerSpec) -> tuple[dict, str | None]:
    """(the parsed tokenizer.json, None) when :mod:`runtimes.spm_bpe` reproduces ``spec`` exactly,
    else ({}, the reason)."""
    if spec.model != TOKENIZER_SPM or not spec.tokenizer_json:
        return {}, "not a SentencePiece-style BPE"
    tj = json.loads(spec.tokenizer_json)
    m = tj.get("model") or {}
    if m.get("type") != "BPE" or not m.get("byte_fallback"):
        return {}, "not a byte-fallback BPE"
    if m.get("dropout") not in (None, 0, 0.0) or m.get("continuing_subword_prefix") or m.get("end_of_word_suffix"):
        return {}, "BPE dropout or subword affixes"
    if m.get("ignore_merges"):  # whole-word vocabulary lookups would need the full string table in memory
        return {}, "BPE ignore_merges"
    for s in (_normalizer_steps(tj.get("normalizer")), _decoder_steps(tj.get("decoder")),
              _prefix_ids(tj.get("post_processor")), _pre_refusal(tj)):
        if isinstance(s, str):
            return {}, s
    for a in tj.get("added_tokens", []):
        if a.get("single_word") or a.get("lstrip") or a.get("rstrip") or not a.get("content"):
            return {}, f"added token {a.get('content')!r} with single_word / lstrip / rstrip"
    return tj, None


def _pre_refusal(tj: dict) -> str | None:
    """None where the pre-tokenizer leaves the text whole (none, or a Split that cannot fire), else
    why it is not supported (no regular expressions: a packed file carries no pattern to run)."""
    pre = tj.get("pre_tokenizer")
    if pre is None or _split_is_noop(pre, _normalizer_steps(tj.get("normalizer"))):
        return None
    return f"pre-tokenizer {pre.get('type')}"


def _split_is_noop(pre: dict, steps) -> bool:
    """Whether a Split pre-tokenizer on a literal string can never fire: the normaliser replaces
    that string everywhere (Gemma's: spaces become "▁", then a Split on " ") and nothing after
    brings it back."""
    if pre.get("type") != "Split" or set(pre.get("pattern", {})) != {"String"} or isinstance(steps, str):
        return False
    p = pre["pattern"]["String"]
    gone = False
    for s in steps:
        if s[0] == "replace" and s[1] == p and p not in s[2]:
            gone = True
        elif p in s[-1] or (s[0] == "replace" and p in s[1] + s[2]):
            gone = False
    return bool(p) and gone


def eos_ids(spec: TokenizerSpec) -> frozenset[int]:
    """The ids that end generation: the EOS id and the control tokens llama.cpp treats as such."""
    ids = {spec.eos_id} if spec.eos_id is not None else set()
    ids.update(i for i, (t, ty) in enumerate(zip(spec.tokens, spec.token_types)) if ty == 3 and t in EOS_NAMES)
    return frozenset(ids)


def normalize(steps, text: str) -> str:
    """``text`` through the packed normaliser steps (Replace everywhere; Prepend to a non-empty text)."""
    for s in steps:
        if s[0] == "replace":
            text = text.replace(s[1], s[2])
        elif text:  # prepend: only to a non-empty text
            text = s[1] + text
    return text


def write_packed(spec: TokenizerSpec, path: Path) -> bool:
    """Write ``spec`` as the packed file at ``path``; False (nothing written) where it is not
    :func:`packable`. Deterministic: the same spec gives the same bytes."""
    tj, why = packable(spec)
    if why is not None:
        return False
    m = tj["model"]
    vocab: dict[str, int] = m["vocab"]
    n = len(spec.tokens)
    texts = [""] * n
    for t, i in vocab.items():
        texts[int(i)] = t
    steps = _normalizer_steps(tj.get("normalizer"))
    for a in tj.get("added_tokens", []):  # tokenizers keeps a normalised added token in its normalised form
        texts[int(a["id"])] = normalize(steps, a["content"]) if a.get("normalized") else a["content"]
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), np.uint8)
    merge_map: dict[int, tuple[int, int]] = {}
    for rank, pair in enumerate(m.get("merges", [])):
        a, b = pair.split(" ", 1) if isinstance(pair, str) else pair
        if a in vocab and b in vocab and a + b in vocab:  # as tokenizers' BPE builder (it refuses others)
            merge_map[int(vocab[a]) * n + int(vocab[b])] = (rank, int(vocab[a + b]))  # a later duplicate wins
    keys = np.array(sorted(merge_map), np.int64)
    chars = sorted((ord(t), int(i)) for t, i in vocab.items() if len(t) == 1)
    byte_ids = np.full(256, -1, np.int32)
    for b in range(256):
        byte_ids[b] = vocab.get(f"<0x{b:02X}>", -1)
    added = sorted((int(a["id"]), int(bool(a.get("special"))) | 2 * int(bool(a.get("normalized"))))
                   for a in tj.get("added_tokens", []))
    tok = lambda i: spec.tokens[i] if i is not None else None  # noqa: E731
    meta = {"format": FORMAT, "n_vocab": n, "normalizer": steps, "decoder": _decoder_steps(tj.get("decoder")),
            "prefix_ids": _prefix_ids(tj.get("post_processor")),
            "unk_id": vocab.get(m["unk_token"]) if m.get("unk_token") is not None else None,
            "fuse_unk": bool(m.get("fuse_unk")),
            "bos_id": spec.bos_id, "eos_id": spec.eos_id, "pad_id": spec.pad_id, "spec_unk_id": spec.unk_id,
            "add_bos": spec.add_bos, "bos_token": tok(spec.bos_id), "eos_token": tok(spec.eos_id),
            "eos_ids": sorted(eos_ids(spec)), "chat_template": spec.chat_template}
    arrays = {"vocab.bytes": blob, "vocab.offsets": offsets, "merges.key": keys,
              "merges.rank": np.array([merge_map[k][0] for k in keys.tolist()], np.int32),
              "merges.new_id": np.array([merge_map[k][1] for k in keys.tolist()], np.int32),
              "chars.codepoint": np.array([c for c, _ in chars], np.int32),
              "chars.id": np.array([i for _, i in chars], np.int32), "bytes.id": byte_ids,
              "added.id": np.array([i for i, _ in added], np.int32),
              "added.flags": np.array([f for _, f in added], np.uint8)}
    specs = {k: (_ARRAYS[k], arrays[k].shape) for k in _ARRAYS}
    with SafetensorsWriter(path, specs, {"edgeq": json.dumps(meta, sort_keys=True, ensure_ascii=False)}) as st:
        for k in _ARRAYS:
            st.write(k, np.ascontiguousarray(arrays[k], dtype=_ARRAYS[k]))
    return True


@dataclass
class Packed:
    """A packed tokenizer file, its arrays views into one read-only memory map."""
    meta: dict
    arrays: dict[str, np.ndarray]

    def token_bytes(self, i: int) -> bytes:
        o = self.arrays["vocab.offsets"]
        return self.arrays["vocab.bytes"][int(o[i]):int(o[i + 1])].tobytes()

    def token_text(self, i: int) -> str:
        return self.token_bytes(i).decode("utf-8", errors="replace")  # valid UTF-8 as written (checked on read)


_DT = {"U8": np.uint8, "I32": np.int32, "I64": np.int64}


def _ints(v, n: int) -> bool:
    """``v`` is a JSON list of ``n`` non-negative integers (not booleans)."""
    return isinstance(v, list) and len(v) == n and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                        for x in v)


def read_packed(path: Path) -> Packed:
    """The packed tokenizer at ``path``, every array and id checked (one EdgeqError line otherwise)."""
    path = Path(path)

    def bad(what: str):
        raise EdgeqError(f"{path}: corrupt packed tokenizer ({what})")

    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 8:
                bad("truncated")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise EdgeqError(f"{path}: unreadable packed tokenizer ({exc.__class__.__name__})") from None
    (hlen,) = struct.unpack("<Q", mm[:8])
    if hlen > size - 8 or hlen > 1 << 24:
        bad("header length")
    try:
        header = json.loads(bytes(mm[8:8 + hlen]).decode("utf-8"))
        meta = json.loads(header.pop("__metadata__")["edgeq"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        bad("header")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        bad("format")
    arrays: dict[str, np.ndarray] = {}
    for name, want in _ARRAYS.items():
        info = header.get(name) if isinstance(header, dict) else None
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            bad(f"{name} missing")
        dt, shape, offs = _DT.get(info["dtype"]) if isinstance(info["dtype"], str) else None, info["shape"], \
            info["data_offsets"]
        if dt is not want or not _ints(shape, 1) or not _ints(offs, 2):
            bad(f"{name} layout")
        a, b = offs
        if not 0 <= a <= b <= size - 8 - hlen or b - a != shape[0] * np.dtype(dt).itemsize:
            bad(f"{name} layout")
        arrays[name] = np.frombuffer(mm, dtype=dt, count=int(shape[0]), offset=8 + hlen + a)
    n = meta.get("n_vocab")
    if not isinstance(n, int) or n < 1 or arrays["vocab.offsets"].shape != (n + 1,):
        bad("vocabulary size")
    o = arrays["vocab.offsets"]
    if o[0] != 0 or o[-1] != arrays["vocab.bytes"].size or np.any(np.diff(o) < 0):
        bad("vocab.offsets")
    try:
        arrays["vocab.bytes"].tobytes().decode("utf-8")
    except UnicodeDecodeError:
        bad("vocab.bytes is not UTF-8")
    k = arrays["merges.key"]
    if not (arrays["merges.rank"].size == arrays["merges.new_id"].size == k.size) or \
            np.any(np.diff(k) <= 0) or (k.size and (k[0] < 0 or k[-1] >= n * n)):
        bad("merge table")
    if arrays["chars.codepoint"].size != arrays["chars.id"].size or np.any(np.diff(arrays["chars.codepoint"]) <= 0) \
            or arrays["bytes.id"].size != 256 or arrays["added.id"].size != arrays["added.flags"].size:
        bad("symbol tables")
    for name in ("merges.new_id", "chars.id", "added.id"):
        a = arrays[name]
        if a.size and (a.min() < 0 or a.max() >= n):
            bad(f"{name} out of range")
    if np.any(arrays["bytes.id"] >= n) or np.any(arrays["bytes.id"] < -1):
        bad("bytes.id out of range")
    ids = [meta.get(key) for key in ("unk_id", "bos_id", "eos_id", "pad_id", "spec_unk_id")]
    ids += list(meta.get("prefix_ids") or []) + list(meta.get("eos_ids") or [])
    if any(i is not None and (not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n) for i in ids):
        bad("special ids")
    for key, kind in (("normalizer", list), ("decoder", list), ("prefix_ids", list), ("eos_ids", list),
                      ("add_bos", bool), ("fuse_unk", bool)):
        if not isinstance(meta.get(key), kind):
            bad(key)
    if not all(isinstance(s, list) and s and s[0] in ("replace", "prepend") and all(isinstance(x, str) for x in s[1:])
               for s in meta["normalizer"]):
        bad("normalizer")
    if not all(isinstance(s, list) and s and s[0] in ("replace", "bytefallback", "fuse", "strip") for s in meta["decoder"]):
        bad("decoder")
    for key in ("chat_template", "bos_token", "eos_token"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            bad(key)
    return Packed(meta, arrays)

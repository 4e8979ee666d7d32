"""Fuzz every file loader edgeq has with hypothesis (issue 18).

Each loader gets inputs derived from a small valid seed file — byte edits (flips, inserted /
deleted runs, boundary integers written over length and count fields), structure-aware edits of
the JSON / TOML documents (a value anywhere replaced by another type, a huge or negative
number, NaN, a deep nesting; a key deleted) and raw bytes — and must either load or raise
:class:`~edgeq.errors.EdgeqError`. Anything else counts as a finding: another exception, a hang
(over ``--timeout`` seconds for one input), a crash, or an allocation the input drove. Each run
of CHUNK inputs happens in a forked child under an address-space limit (``RLIMIT_AS``: what it
uses at start plus ``--mem-mb``; the parent has none), so an allocation sized by a claimed length
larger than the file raises ``MemoryError``; the parent watches the child's progress and kills it
when one input runs past the timeout, keeping that input (see "the driver" below).

    python tools/fuzz_loaders.py                      # 100000 inputs per loader (docs/robustness.md)
    python tools/fuzz_loaders.py -n 2000 --loader gguf

Loaders: safetensors (header + data), gguf (edgeq's GGUF reader), manifest (read_manifest +
check_files), plan (Plan.from_toml), adapter (adapter_config.json + adapter_model.safetensors on
a tiny model), tokenizer (read_tokenizer_spec), packed-tokenizer (read_packed, then a session's
encode / decode over it), goldens (goldens.load + compare).
The test suite (tests/test_fuzz_loaders.py) runs the same strategies for a few hundred inputs.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __name__ == "__main__":  # one thread per numeric library: fork-safe children, less address space
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np
import hypothesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgeq.errors import EdgeqError  # noqa: E402

# ---- seeds: one small valid input per loader ------------------------------------------------


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def _gguf_bytes(path: Path) -> bytes:
    """A minimal llama GGUF: hidden 8, 2 heads, 1 layer, vocab 6 (F32 and one Q8_0 tensor)."""
    import gguf

    from edgeq.ir import Role

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fuzz")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["a", "b", "c", "Ġa", "<s>", "</s>"])
    w.add_token_types([1, 1, 1, 1, 3, 3])
    w.add_token_merges(["Ġ a"])
    w.add_bos_token_id(4)
    w.add_eos_token_id(5)
    shapes = {"token_embd.weight": (6, 8), "output_norm.weight": (8,), "output.weight": (6, 8),
              "blk.0.attn_norm.weight": (8,), "blk.0.ffn_norm.weight": (8,)}
    for role in Role:
        shapes[f"blk.0.{role.value}.weight"] = {"ffn_gate": (32, 8), "ffn_up": (32, 8), "ffn_down": (8, 32)}.get(
            role.value, (8, 8))
    for name, shape in shapes.items():
        a = rng.standard_normal(shape).astype(np.float32)
        if name == "blk.0.ffn_down.weight":
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _plan_text() -> str:
    from edgeq.plan import Choice, Plan

    tensors = {"token_embd": Choice("Q8_0", 0), "output": Choice("Q6_K", 0),
               "blk.0.attn_q": Choice("Q4_K", 8), "blk.0.ffn_down": Choice("Q4_0", 0)}
    return Plan(target="cpu-avx2", tensors=tensors, budget_bytes=123456, model="tiny",
                notes={"blk.0.attn_q": {"bytes": 1000, "kl": 0.01}}, summary={"bpw": 4.5}).to_toml()


def _tokenizer_spec() -> dict:
    from edgeq.ir import TokenizerSpec

    return TokenizerSpec(tokenizer_json='{"model": {"type": "BPE"}}', model="gpt2", pre="default",
                         tokens=("a", "b", "<s>"), token_types=(1, 1, 3), merges=("a b",), bos_id=2,
                         eos_id=2, pad_id=None, unk_id=None, add_bos=True, chat_template=None).to_json()


def _spm_tokenizer_json() -> dict:
    """A small Gemma-shaped SentencePiece BPE tokenizer.json: specials, the 256 byte tokens, a few
    pieces and their merges, an added special token."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "\u2581he", "llo", "\u2581hello", "<turn>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [["h", "e"], ["l", "l"], ["\u2581", "he"], ["ll", "o"], ["\u2581he", "llo"]]
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in specials + ["<turn>"]]
    return {"version": "1.0", "added_tokens": added,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                              "invert": False},
            "post_processor": {"type": "TemplateProcessing", "single": [
                {"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [], "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}


def _goldens(vocab: int) -> dict:
    rng = np.random.default_rng(1)
    token_ids = [[1, 2, 3], [4, 0]]

    def entry():
        ids, lps = [], []
        for t in token_ids:
            ids.append([rng.permutation(vocab)[:3].tolist() for _ in t])
            lps.append([sorted(np.round(-rng.random(3) * 5, 5).tolist(), reverse=True) for _ in t])
        return {"topk_ids": ids, "topk_logprobs": lps}

    return {"token_ids": token_ids, "rates": {"0": {"artifact": entry(), "reference": entry()}}}


@dataclass
class Loader:
    name: str
    kind: str  # "binary" | "json" | "toml" | "safetensors" | "adapter"
    seed: bytes
    run: Callable[[bytes], object]
    extra: dict = field(default_factory=dict)


def make_loaders(work: Path, tiny: Path | None = None) -> dict[str, Loader]:
    """The loaders under test, each with its seed and a function feeding it one input
    (``tiny``: a tiny Llama checkpoint for the adapter loader; made under ``work`` if None)."""
    from edgeq.artifact import artifact_rates, check_files, gguf_file_for_rate, read_manifest, read_tokenizer_spec
    from edgeq.backends.gguf.lower import read_gguf
    from edgeq.frontend.hf import load_hf
    from edgeq.frontend.safetensors_io import read_header, read_safetensors
    from edgeq.goldens import compare, load_goldens
    from edgeq.hashing import sha256_file
    from edgeq.plan import Plan
    from models.tiny import make_random_lora, make_tiny_llama

    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Loader] = {}

    st_file = work / "fuzz.safetensors"

    def load_st(data: bytes):
        st_file.write_bytes(data)
        read_header(st_file)
        return read_safetensors(st_file)

    rng = np.random.default_rng(0)
    st_seed = _safetensors_bytes({"a": rng.standard_normal((4, 3)).astype(np.float32),
                                  "b": np.arange(5, dtype=np.int32), "c": np.ones(2, np.float16)},
                                 metadata={"format": "pt"})
    out["safetensors"] = Loader("safetensors", "safetensors", st_seed, load_st)

    gguf_file = work / "fuzz.gguf"
    gguf_seed = _gguf_bytes(work / "seed.gguf")

    def load_gguf(data: bytes):
        gguf_file.write_bytes(data)
        return read_gguf(gguf_file)

    out["gguf"] = Loader("gguf", "binary", gguf_seed, load_gguf)

    art = work / "artifact"
    art.mkdir(exist_ok=True)
    (art / "model.gguf").write_bytes(b"GGUF-not-really")
    (art / "goldens.json").write_text("{}")
    manifest = {"schema_version": 1, "format": "gguf", "model_file": "model.gguf", "weight_type": "Q8_0",
                "goldens": {"file": "goldens.json", "positions": 3},
                "prune": {"rates": [0.0, 0.5], "files": {"0": "model.gguf", "0.5": "model.gguf"}},
                "files": {n: {"sha256": sha256_file(art / n), "bytes": (art / n).stat().st_size}
                          for n in ("model.gguf", "goldens.json")}}

    def load_manifest(data: bytes):
        (art / "manifest.json").write_bytes(data)
        m = read_manifest(art)
        for rate in artifact_rates(m):  # what run / verify / profile read next
            gguf_file_for_rate(m, rate)
        return check_files(art, m)

    out["manifest"] = Loader("manifest", "json", json.dumps(manifest, indent=1).encode(), load_manifest)

    def load_plan(data: bytes):
        return Plan.from_toml(data.decode("utf-8", errors="replace"), where="fuzz.toml")

    out["plan"] = Loader("plan", "toml", _plan_text().encode(), load_plan)

    tok_file = work / "tokenizer.spec.json"

    def load_tok(data: bytes):
        tok_file.write_bytes(data)
        return read_tokenizer_spec(tok_file)

    out["tokenizer"] = Loader("tokenizer", "json", json.dumps(_tokenizer_spec()).encode(), load_tok)

    # the packed SentencePiece vocabulary a session memory-maps, then encodes and decodes with
    from edgeq.frontend.tokenizer import load_tokenizer_spec
    from edgeq.tokenizer_pack import read_packed, write_packed
    from runtimes.spm_bpe import SpmBpe

    src = work / "spm-src"
    src.mkdir(exist_ok=True)
    (src / "tokenizer.json").write_text(json.dumps(_spm_tokenizer_json()), encoding="utf-8")
    packed_file = work / "tokenizer.vocab.safetensors"
    write_packed(load_tokenizer_spec(src, "gemma3"), packed_file)
    packed_seed = packed_file.read_bytes()

    def load_packed(data: bytes):
        packed_file.write_bytes(data)
        sp = SpmBpe(read_packed(packed_file))
        ids = sp.encode("hello world <turn> \u00e9\U0001F642")
        return ids, sp.decode(ids + list(range(sp.meta["n_vocab"])), skip_special=False)

    out["packed-tokenizer"] = Loader("packed-tokenizer", "safetensors", packed_seed, load_packed)

    vocab = 10
    g_file = work / "goldens.json"
    lps = [np.log(np.full((3, vocab), 1.0 / vocab)), np.log(np.full((2, vocab), 1.0 / vocab))]

    def load_goldens_(data: bytes):
        g_file.write_bytes(data)
        g = load_goldens(g_file)
        actual = [lps[i % 2][: len(t)] if len(t) <= len(lps[i % 2]) else np.log(np.full((len(t), vocab), 0.1))
                  for i, t in enumerate(g["token_ids"])]
        for entry in g["rates"].values():
            compare(entry["artifact"], actual, where=str(g_file))
            compare(entry["reference"], actual, clear_margin=0.5, where=str(g_file))
        return g

    out["goldens"] = Loader("goldens", "json", json.dumps(_goldens(vocab)).encode(), load_goldens_)

    if tiny is None:
        tiny = make_tiny_llama(work / "tiny", seed=0)
    lora = work / "lora-seed"
    if not (lora / "adapter_config.json").exists():
        make_random_lora(tiny, lora, r=2, alpha=4, target_modules=("q_proj", "v_proj"), seed=1)
    ir = load_hf(tiny)
    from edgeq.frontend.peft import load_adapter

    adir = work / "adapter"
    adir.mkdir(exist_ok=True)
    cfg_seed = (lora / "adapter_config.json").read_bytes()
    w_seed = (lora / "adapter_model.safetensors").read_bytes()

    def load_adapter_(data: bytes):
        # one input = which file is fuzzed (first byte) + its new content; the other stays valid
        which, body = (data[:1] or b"\0"), data[1:]
        cfg, weights = (body, w_seed) if which[0] % 2 == 0 else (cfg_seed, body)
        (adir / "adapter_config.json").write_bytes(cfg)
        (adir / "adapter_model.safetensors").write_bytes(weights)
        return load_adapter(ir, adir, name="fuzz")

    out["adapter"] = Loader("adapter", "adapter", b"\0" + cfg_seed, load_adapter_,
                            extra={"cfg": cfg_seed, "weights": w_seed})
    return out


# ---- strategies -----------------------------------------------------------------------------

BOUNDARY_INTS = [0, 1, 2, 7, 8, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                 10**12, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _json_scalars():
    return st.one_of(st.none(), st.booleans(), st.sampled_from(BOUNDARY_INTS + [-1, -(2**63), 10**30]),
                     st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))


JSON_VALUES = st.recursive(_json_scalars(), lambda c: st.one_of(st.lists(c, max_size=4),
                                                                st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=12)


@st.composite
def byte_edits(draw, seed: bytes, focus: int = 1024) -> bytes:
    """``seed`` with a few edits, positions biased to its first ``focus`` bytes (the headers)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        n = len(data)
        pos = draw(st.one_of(st.integers(0, max(0, min(n, focus) - 1)), st.integers(0, max(0, n - 1))))
        op = draw(st.sampled_from(["flip", "byte", "int", "insert", "delete", "truncate", "dup"]))
        if op == "flip" and n:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and n:
            data[pos] = draw(st.integers(0, 255))
        elif op == "int":
            width = draw(st.sampled_from([4, 8]))
            v = draw(st.sampled_from(BOUNDARY_INTS + [n, n + 1, max(n - 1, 0)])) % (1 << (8 * width))
            data[pos:pos + width] = v.to_bytes(width, "little")
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        elif op == "dup" and n:
            end = min(n, pos + draw(st.integers(1, 64)))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            yield from _paths(v, prefix + (i,))


@st.composite
def json_edits(draw, doc) -> object:
    """``doc`` (parsed JSON) with values replaced (any type), keys deleted or added."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not path:
            if op == "replace":
                doc = draw(JSON_VALUES)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if op == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            parent.append(draw(JSON_VALUES))
    return doc


def _dumps(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


TOML_VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1e400", "nan", "inf", "-inf", "true", "\"\"", "[]", "{}", "[1, \"a\"]",
                     "{ type = 1 }", "{ type = \"Q4_K\", rank = -5 }", "{ type = \"Q4_K\", rank = 1e3 }",
                     "{ type = \"Q4_K\", rank = 99999999999999999999 }", "1979-05-27T07:32:00Z",
                     "\"\\u0000\"", "9223372036854775807", "[[1]]", "{ type = [] }", "\"Q9_Z\""]),
    st.integers().map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=10).map(json.dumps))


@st.composite
def toml_edits(draw, seed: bytes) -> bytes:
    lines = seed.decode().splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        op = draw(st.sampled_from(["value", "value", "delete", "dup", "header", "key"]))
        if not lines:
            lines.append("x = 1")
        elif op == "value" and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {draw(TOML_VALUES)}"
        elif op == "delete":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "header":
            lines.insert(i, draw(st.sampled_from(["[method]", "[tensors]", "[budget]", "[[tensors]]", "[method.x]",
                                                  "method = 1", "tensors = 1", "budget = \"x\""])))
        else:
            lines.insert(i, f"{draw(st.sampled_from(['version', 'target', 'damp', 'rank', 'quantizer']))} = "
                            f"{draw(TOML_VALUES)}")
    return "\n".join(lines).encode()


@st.composite
def safetensors_edits(draw, seed: bytes) -> bytes:
    """A re-encoded header with JSON edits (tensor entries given other dtypes / shapes /
    offsets, 10**12-element shapes) over the seed's data, with a right or wrong length field."""
    (n,) = struct.unpack("<Q", seed[:8])
    header, data = json.loads(seed[8:8 + n]), seed[8 + n:]
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field_ = draw(st.sampled_from(["shape", "data_offsets", "dtype"]))
        header[name][field_] = draw(st.one_of(
            JSON_VALUES,
            st.lists(st.sampled_from(BOUNDARY_INTS + [-1, 3, 4]), max_size=4),
            st.sampled_from(["F32", "BF16", "F64", "I8", "BOOL", "U64", "F8_E4M3"]),
            st.just([10**6, 10**6]), st.just([0, 4 * 10**12]), st.just([2**62, 2**62 + 8])))
    else:
        header = draw(json_edits(header))
    h = _dumps(header)
    length = len(h) if draw(st.integers(0, 3)) else draw(st.sampled_from(BOUNDARY_INTS))
    return struct.pack("<Q", length % 2**64) + h + data


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    return json.dumps(str(v))


def dump_toml(doc) -> bytes:
    """A small TOML writer for fuzzed documents (top-level scalars, then one table per dict)."""
    if not isinstance(doc, dict):
        return f"x = {_toml_value(doc)}".encode()
    lines = [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in doc.items() if v is not None and not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{json.dumps(str(k))}]")
            lines += [f"{json.dumps(str(kk))} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None]
    return "\n".join(lines).encode()


def strategy_for(loader: Loader):
    raw = st.binary(max_size=256)
    if loader.kind == "binary":
        return st.one_of(byte_edits(loader.seed), raw)
    if loader.kind == "safetensors":
        return st.one_of(safetensors_edits(loader.seed), byte_edits(loader.seed), raw)
    if loader.kind == "toml":
        import tomllib

        doc = tomllib.loads(loader.seed.decode())
        return st.one_of(json_edits(doc).map(dump_toml), toml_edits(loader.seed), byte_edits(loader.seed), raw)
    if loader.kind == "adapter":
        cfg, w = loader.extra["cfg"], loader.extra["weights"]
        cfg_doc = json.loads(cfg)
        return st.one_of(
            json_edits(cfg_doc).map(lambda d: b"\0" + _dumps(d)),
            byte_edits(cfg).map(lambda b: b"\0" + b),
            safetensors_edits(w).map(lambda b: b"\1" + b),
            byte_edits(w, focus=512).map(lambda b: b"\1" + b))
    doc = json.loads(loader.seed)
    return st.one_of(json_edits(doc).map(_dumps), byte_edits(loader.seed), raw)


# ---- the driver -----------------------------------------------------------------------------
#
# Each run of CHUNK inputs happens in a forked child process; the parent only watches it. The
# child runs under the address-space limit (the parent, its temp directory and its clean-up do
# not), raises nothing from signal handlers, and before each input writes the input to a file and
# a line to a pipe. The parent kills a child whose input has run past ``timeout`` seconds of wall
# time (or that has gone quiet between inputs, or died), keeps the input it was on, and runs that
# input again alone in a fresh child: a hang or crash that comes back is a finding with the input
# saved; one that does not is reported as a harness event (load spike, deadlock outside the
# loader), never silently dropped.

class Hang(BaseException):
    """Raised by the in-process SIGALRM limit; a BaseException so that a loader's own
    ``except Exception`` (read_gguf wraps gguf-py's errors) cannot turn it into a refusal."""


_armed = False


def _alarm(signum, frame):
    if _armed:  # a late alarm (after the call returned, between inputs) is ignored
        raise Hang("one input ran past the time limit")


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """SIGALRM around one call, for in-process use (the test suite's short run). Only in the
    main thread; the fuzzing runs themselves use the watchdog process instead (no signals)."""
    global _armed
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGALRM, _alarm)
    _armed = True
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Result:
    loader: str
    inputs: int = 0
    accepted: int = 0
    refused: int = 0
    seconds: float = 0.0
    findings: dict = field(default_factory=dict)  # signature -> (count, example path, traceback)
    harness: list = field(default_factory=list)  # stalls / child deaths that did not reproduce


def run_one(loader: Loader, data: bytes, timeout: float | None = None):
    """'accepted' | 'refused' | the unexpected exception (a finding). ``timeout``: a SIGALRM
    limit for in-process callers; None in the fuzzing child (the parent's watchdog times it)."""
    try:
        with time_limit(timeout):
            loader.run(data)
        return "accepted"
    except EdgeqError as exc:
        masked = _masked(exc)
        if masked is not None:  # e.g. read_gguf's "corrupt GGUF file: MemoryError"
            return masked
        msg = str(exc)
        if "\n" in msg or not msg:
            return AssertionError(f"EdgeqError message is not one line: {msg!r}")
        return "refused"
    except (Exception, Hang) as exc:  # noqa: BLE001 - every other exception is a finding
        return exc


def _masked(exc: BaseException) -> BaseException | None:
    """A MemoryError or Hang an EdgeqError was raised from (``from None`` still keeps it as
    ``__context__``): a refusal that hides an allocation past the limit or a hang is a finding."""
    seen = set()
    e = exc.__cause__ or exc.__context__
    while e is not None and id(e) not in seen:
        if isinstance(e, (MemoryError, Hang)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


CHUNK = 2000  # inputs per hypothesis run (one child process): its record of explored inputs grows with a run's length
STALL_S = 120.0  # a child that neither starts nor finishes an input for this long is stuck outside the loader


def _signature(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else "?"
    return f"{type(exc).__name__} at {where}"


def _child(body: Callable[[Callable[[str], None]], None], wfd: int, mem_mb: int | None) -> None:
    """In the forked child: run ``body(send)``, never return (os._exit: no clean-up of the
    parent's temp directory, no atexit handlers)."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent handles ^C
        if mem_mb is not None:
            limit_address_space(mem_mb)

        def send(line: str) -> None:
            os.write(wfd, (line + "\n").encode())

        body(send)
        send("D")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
        code = 3
        try:
            os.write(wfd, ("X " + json.dumps(f"{_signature(exc)}: {exc!r}"[:1000]) + "\n").encode())
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


@dataclass
class Outcome:
    how: str  # "done" | "hang" | "stall" | "died"
    in_input: bool  # whether the child was inside a loader call when it ended
    detail: str = ""


def _supervise(body, on_line: Callable[[str], None], timeout: float, mem_mb: int | None) -> Outcome:
    """Fork a child running ``body``; pass its lines to ``on_line``; kill it (SIGKILL) when one
    input runs past ``timeout`` s or nothing happens for STALL_S s."""
    import select

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(rfd)
        _child(body, wfd, mem_mb)
    os.close(wfd)
    buf, in_input, last, how, detail, done = b"", False, time.monotonic(), None, "", False
    try:
        while how is None:
            limit = (timeout if in_input else STALL_S) - (time.monotonic() - last)
            ready, _, _ = select.select([rfd], [], [], max(limit, 0))
            if not ready:
                how = "hang" if in_input else "stall"
                detail = f"no progress for {time.monotonic() - last:.1f} s"
                break
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break  # the child exited (or died)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode()
                if line == "S":
                    in_input, last = True, time.monotonic()
                elif line == "D":
                    done = True
                elif line.startswith("X "):
                    detail = json.loads(line[2:])
                else:
                    in_input, last = False, time.monotonic()
                    on_line(line)
    finally:
        if how is not None:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(rfd)
    if how is None:
        if done and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return Outcome("done", False)
        how = "died"
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        detail = (f"killed by signal {sig}" if sig else f"exit status {os.WEXITSTATUS(status)}") + \
            (f": {detail}" if detail else "")
    return Outcome(how, in_input, detail)


def _chunk_body(loader: Loader, strategy, k: int, hyp_seed: int, current: Path, out_dir: Path | None, tag: str):
    """The child's work: ``k`` hypothesis inputs, one line per input to the parent."""

    def body(send):
        nfound = 0

        def one(data):
            nonlocal nfound
            current.write_bytes(data)
            send("S")
            r = run_one(loader, data)
            if r in ("accepted", "refused"):
                send(r[0].upper())
                return
            path = None
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                path = out_dir / f"{loader.name}-{tag}-{nfound}.bin"
                path.write_bytes(data)
                nfound += 1
            text = "".join(traceback.format_exception(r))[-2000:]
            send("F " + json.dumps({"sig": _signature(r), "path": str(path) if path else None, "text": text}))

        run = hypothesis.seed(hyp_seed)(
            settings(max_examples=k, database=None, deadline=None, phases=[Phase.generate],
                     suppress_health_check=list(HealthCheck))(given(strategy)(one)))
        run()

    return body


def _record(res: Result, line: str) -> None:
    if line == "A":
        res.accepted += 1
    elif line == "R":
        res.refused += 1
    elif line.startswith("F "):
        f = json.loads(line[2:])
        count, path, text = res.findings.get(f["sig"], (0, None, None))
        res.findings[f["sig"]] = (count + 1, path or f["path"], text or f["text"])


def reproduce(loader: Loader, data: bytes, timeout: float, mem_mb: int | None, work: Path) -> tuple[str, str]:
    """Run one input alone in a fresh child: ('accepted' | 'refused' | 'finding' | 'hang' | 'stall'
    | 'died', detail)."""
    got: list[str] = []

    def body(send):
        send("S")
        r = run_one(loader, data)
        send(r[0].upper() if isinstance(r, str) else "F " + json.dumps(
            {"sig": _signature(r), "text": "".join(traceback.format_exception(r))[-2000:]}))

    out = _supervise(body, got.append, timeout, mem_mb)
    if out.how != "done":
        return out.how, out.detail
    line = got[-1] if got else ""
    if line == "A":
        return "accepted", ""
    if line == "R":
        return "refused", ""
    f = json.loads(line[2:])
    return "finding", f"{f['sig']}\n{f['text']}"


def fuzz(loader: Loader, n: int, timeout: float, out_dir: Path | None, seed: int = 0,
         progress: Callable[[Result], None] | None = None, mem_mb: int | None = 1024,
         work: Path | None = None, first_run: int = 0) -> Result:
    """``n`` inputs for ``loader``, as runs of CHUNK inputs seeded ``seed * 1000003 + first_run,
    first_run + 1, ...`` (``first_run``: continue a stopped run of the same seed without repeating),
    each run in a child process watched by this one (see above)."""
    res = Result(loader.name)
    t0 = time.perf_counter()
    strategy = strategy_for(loader)
    work = work or Path(tempfile.gettempdir())
    current = work / f".fuzz-current-{loader.name}-{os.getpid()}.bin"
    done, chunk = 0, first_run
    while done < n:
        k = min(CHUNK, n - done)
        before = res.inputs

        def on_line(line):
            res.inputs += 1
            _record(res, line)

        tag = f"s{seed}c{chunk}"
        out = _supervise(_chunk_body(loader, strategy, k, seed * 1_000_003 + chunk, current, out_dir, tag),
                         on_line, timeout, mem_mb)
        if out.how != "done":
            _abnormal(res, loader, out, current, timeout, mem_mb, work, out_dir, tag)
        done += max(res.inputs - before, 1)  # hypothesis may stop early when a space is exhausted
        chunk += 1
        res.seconds = time.perf_counter() - t0
        if progress is not None:
            progress(res)
    with contextlib.suppress(FileNotFoundError):
        current.unlink()
    return res


def _abnormal(res: Result, loader: Loader, out: Outcome, current: Path, timeout: float, mem_mb: int | None,
              work: Path, out_dir: Path | None, tag: str) -> None:
    """A child hung, stalled or died: a finding if the input it was on does it again alone."""
    what = f"run {tag}: child {out.how} ({out.detail})"
    if not out.in_input:
        res.harness.append(what + ", between inputs")
        return
    res.inputs += 1  # the input it was on
    data = current.read_bytes()
    again, detail = reproduce(loader, data, timeout, mem_mb, work)
    path = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{loader.name}-{tag}-{out.how}.bin"
        path.write_bytes(data)
    if again in ("hang", "stall", "died", "finding"):
        sig = {"hang": f"Hang (over {timeout:g} s)", "stall": f"Hang (over {timeout:g} s)",
               "died": "child process died"}.get(again, detail.split("\n", 1)[0])
        count, p0, text = res.findings.get(sig, (0, None, None))
        res.findings[sig] = (count + 1, p0 or path, text or f"{what}; alone again: {again} ({detail})")
    else:
        if again == "accepted":
            res.accepted += 1
        else:
            res.refused += 1
        res.harness.append(f"{what}; the input alone: {again} (example: {path})")


def limit_address_space(extra_mb: int) -> None:
    """RLIMIT_AS = this process's address space now + ``extra_mb`` (called in the child)."""
    import resource

    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vm + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="inputs per loader")
    ap.add_argument("--loader", action="append", help="only these loaders (repeatable)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds one input may take")
    ap.add_argument("--mem-mb", type=int, default=1024,
                    help="address space each fuzzing child may add to what it starts with (RLIMIT_AS)")
    ap.add_argument("--findings", type=Path, default=Path("fuzz-findings"), help="where failing inputs go")
    ap.add_argument("--json", type=Path, default=None, help="write the counts as JSON")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed of the first run")
    ap.add_argument("--first-run", type=int, default=0,
                    help="start at this run of 2000 inputs of --seed (continue a stopped fuzzing run)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgeq-fuzz.") as tmp:
        loaders = make_loaders(Path(tmp))
        names = args.loader or list(loaders)
        results = []
        for name in names:
            r = fuzz(loaders[name], args.n, args.timeout, args.findings, seed=args.seed, mem_mb=args.mem_mb,
                     first_run=args.first_run,
                     work=Path(tmp),
                     progress=lambda r: print(f"  {r.loader}: {r.inputs} inputs, {r.seconds:.0f} s, "
                                              f"findings {len(r.findings)}, harness events {len(r.harness)}",
                                              flush=True))
            results.append(r)
            print(f"{name:12s} {r.inputs:8d} inputs  {r.accepted:7d} loaded  {r.refused:7d} refused  "
                  f"{r.seconds:7.1f} s  findings: {len(r.findings)}", flush=True)
            for sig, (count, path, text) in r.findings.items():
                print(f"    {count:6d} x {sig}  (example: {path})\n{text}", flush=True)
            for event in r.harness:
                print(f"    harness: {event}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([{"loader": r.loader, "inputs": r.inputs, "accepted": r.accepted,
                                          "refused": r.refused, "seconds": round(r.seconds, 1),
                                          "findings": {k: v[0] for k, v in r.findings.items()},
                                          "harness": r.harness, "seed": args.seed, "timeout": args.timeout,
                                          "mem_mb": args.mem_mb}
                                         for r in results], indent=1) + "\n")
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

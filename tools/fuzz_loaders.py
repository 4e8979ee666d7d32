"""Fuzz every file loader edgeq has with hypothesis (issue 18).

Each loader gets inputs derived from a small valid seed file — byte edits (flips, inserted /
deleted runs, boundary integers written over length and count fields), structure-aware edits of
the JSON / TOML documents (a value anywhere replaced by another type, a huge or negative
number, NaN, a deep nesting; a key deleted) and raw bytes — and must either load or raise
:class:`~edgeq.errors.EdgeqError`. Anything else counts as a finding: another exception, a hang
(over ``--timeout`` seconds for one input) or an allocation the input drove: the process runs
under an address-space limit (``RLIMIT_AS``: what it uses at start plus ``--mem-mb``), so an
allocation sized by a claimed length larger than the file raises ``MemoryError``.

    python tools/fuzz_loaders.py                      # 100000 inputs per loader (docs/robustness.md)
    python tools/fuzz_loaders.py -n 2000 --loader gguf

Loaders: safetensors (header + data), gguf (edgeq's GGUF reader), manifest (read_manifest +
check_files), plan (Plan.from_toml), adapter (adapter_config.json + adapter_model.safetensors on
a tiny model), tokenizer (read_tokenizer_spec), goldens (goldens.load + compare).
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

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("one input ran past the time limit")


@contextlib.contextmanager
def time_limit(seconds: float):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
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


def run_one(loader: Loader, data: bytes, timeout: float):
    """'accepted' | 'refused' | the unexpected exception (a finding)."""
    try:
        with time_limit(timeout):
            loader.run(data)
        return "accepted"
    except EdgeqError as exc:
        msg = str(exc)
        if "\n" in msg or not msg:
            return AssertionError(f"EdgeqError message is not one line: {msg!r}")
        return "refused"
    except Exception as exc:  # noqa: BLE001 - every other exception is a finding
        return exc


CHUNK = 2000  # inputs per hypothesis run: its record of explored inputs grows with a run's length


def fuzz(loader: Loader, n: int, timeout: float, out_dir: Path | None, seed: int = 0,
         progress: Callable[[Result], None] | None = None) -> Result:
    """``n`` inputs for ``loader``, as runs of CHUNK inputs seeded ``seed``, ``seed + 1``, ..."""
    res = Result(loader.name)
    t0 = time.perf_counter()
    strategy = strategy_for(loader)

    def one(data):
        res.inputs += 1
        r = run_one(loader, data, timeout)
        if r == "accepted":
            res.accepted += 1
        elif r == "refused":
            res.refused += 1
        else:
            tb = traceback.extract_tb(r.__traceback__)
            where = f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else "?"
            sig = f"{type(r).__name__} at {where}"
            count, path, text = res.findings.get(sig, (0, None, None))
            if path is None and out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                path = out_dir / f"{loader.name}-{len(res.findings)}.bin"
                path.write_bytes(data)
            res.findings[sig] = (count + 1, path, text or "".join(traceback.format_exception(r))[-2000:])

    done, chunk = 0, 0
    while done < n:
        k = min(CHUNK, n - done)
        run = hypothesis.seed(seed * 1_000_003 + chunk)(
            settings(max_examples=k, database=None, deadline=None, phases=[Phase.generate],
                     suppress_health_check=list(HealthCheck))(given(strategy)(one)))
        before = res.inputs
        run()
        # refused inputs leave memory maps in exception reference cycles until a full collection;
        # without one the address space (RLIMIT_AS) fills up after ~46 000 GGUF inputs
        gc.collect()
        done += max(res.inputs - before, 1)  # hypothesis may stop early when a space is exhausted
        chunk += 1
        res.seconds = time.perf_counter() - t0
        if progress is not None:
            progress(res)
    return res


def limit_address_space(extra_mb: int) -> None:
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
    ap.add_argument("--mem-mb", type=int, default=1024, help="address space allowed beyond the start")
    ap.add_argument("--findings", type=Path, default=Path("fuzz-findings"), help="where failing inputs go")
    ap.add_argument("--json", type=Path, default=None, help="write the counts as JSON")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed of the first run")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgeq-fuzz.") as tmp:
        loaders = make_loaders(Path(tmp))
        limit_address_space(args.mem_mb)
        names = args.loader or list(loaders)
        results = []
        for name in names:
            r = fuzz(loaders[name], args.n, args.timeout, args.findings, seed=args.seed,
                     progress=lambda r: print(f"  {r.loader}: {r.inputs} inputs, {r.seconds:.0f} s, "
                                              f"findings {len(r.findings)}", flush=True))
            results.append(r)
            print(f"{name:12s} {r.inputs:8d} inputs  {r.accepted:7d} loaded  {r.refused:7d} refused  "
                  f"{r.seconds:7.1f} s  findings: {len(r.findings)}", flush=True)
            for sig, (count, path, text) in r.findings.items():
                print(f"    {count:6d} x {sig}  (example: {path})\n{text}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([{"loader": r.loader, "inputs": r.inputs, "accepted": r.accepted,
                                          "refused": r.refused, "seconds": round(r.seconds, 1),
                                          "findings": {k: v[0] for k, v in r.findings.items()}}
                                         for r in results], indent=1) + "\n")
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

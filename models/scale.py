"""Random-weight Llama checkpoints with the real shapes of Llama-3.2-1B / 3B and Llama-3.1-8B.

For measuring edgeq (and llama.cpp, side by side) at real model sizes without downloading
gated weights. The output is an ordinary Hugging Face checkpoint directory, bf16, sharded the
way ``save_pretrained`` does it (at most ``--max-shard-gib`` GiB per file, 4 by default):

    config.json  generation_config.json
    model.safetensors                       (when everything fits one shard, as on the Hub), or
    model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json  tokenizer_config.json  special_tokens_map.json   (copied, see below)
    .edgeq-recipe.json                      (marker, written last: sizes and sha256 of every file)

Shapes (checked against the public config.json files of the meta-llama releases):

    ============= ====== ====== ====== ======== ====== ====== ====== ========
    shape         hidden layers ffn    heads/kv head   vocab  tied   params
    ============= ====== ====== ====== ======== ====== ====== ====== ========
    llama-3.2-1b  2048   16     8192   32/8     64     128256 yes    1.24 B
    llama-3.2-3b  3072   28     8192   24/8     128    128256 yes    3.21 B
    llama-3.1-8b  4096   32     14336  32/8     128    128256 no     8.03 B
    ============= ====== ====== ====== ======== ====== ====== ====== ========

All have rope_theta 500000, rms_norm_eps 1e-5, max_position_embeddings 131072. The releases
also carry ``rope_scaling: {rope_type: llama3, factor: 32 (8 for 8B), ...}``; edgeq refuses
non-default rope scaling today, so it is left out unless ``--llama3-rope-scaling`` is given
(it changes only the rotary frequencies, not a single weight or byte of the safetensors).
``--layers N`` overrides the depth (e.g. an 8B-wide model with 2 layers, to time one layer);
``--shape test-tiny`` is a small shape for fast tests.

Weights: every linear and the embedding ~ N(0, 0.02) (transformers' ``initializer_range``),
norms = 1, rounded to bf16 with round-to-nearest-even. Deterministic from ``--seed``: each
tensor has its own generator seeded with (seed, tensor index), so the same call writes
byte-identical files. Written streaming: header first, then each tensor in chunks of at most
``CHUNK`` values, so memory stays bounded by one chunk (~0.3 GB), not by the model.

Tokenizer: the vocabulary is ``vocab_size`` 128256 like Llama-3, but the tokenizer is
SmolLM2's (49152 tokens; byte-level BPE that llama.cpp recognises as ``smollm``), copied from
a SmolLM2 checkpoint directory (``--tokenizer DIR``; by default $EDGEQ_SMOLLM2 or
models/cache/smollm2-135m-instruct, made by ``python -m models.smollm2``). Ids >= 49152 are
unused rows; edgeq's and llama.cpp's GGUF writers both pad the token list with ``[PAD<i>]``.
``--tokenizer tiny`` uses the 384-token tiny tokenizer of :mod:`models.tiny` instead (no
SmolLM2 needed; llama.cpp's converter does not recognise its pre-tokenizer).

Usage (from the repository root)::

    python -m models.scale --shape llama-3.2-1b --out /work/scale/llama-3.2-1b [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from models import CACHE_DIR, MARKER, atomic_dir, run_main, write_json

RECIPE = "scale-llama/v1"
GIB = 1 << 30
CHUNK = 1 << 25  # values generated at a time (32M float32 = 128 MiB, + its bf16 and a temporary)
INIT_STD = 0.02
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SMOLLM2_DEFAULT = CACHE_DIR / "smollm2-135m-instruct"


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    rope_factor: float = 32.0  # the release's llama3 rope_scaling factor (only with --llama3-rope-scaling)


SHAPES: dict[str, Shape] = {
    "llama-3.2-1b": Shape(2048, 16, 8192, 32, 8, 64, 128256, True, 32.0),
    "llama-3.2-3b": Shape(3072, 28, 8192, 24, 8, 128, 128256, True, 32.0),
    "llama-3.1-8b": Shape(4096, 32, 14336, 32, 8, 128, 128256, False, 8.0),
    # for tests: every dimension a multiple of 32 (a quant block); vocab > the tiny tokenizer's 384
    "test-tiny": Shape(128, 2, 256, 4, 2, 32, 512, True, 32.0),
}


def tensor_specs(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the module order ``save_pretrained`` writes them."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (q, s.hidden)),
            (p + "self_attn.k_proj.weight", (kv, s.hidden)),
            (p + "self_attn.v_proj.weight", (kv, s.hidden)),
            (p + "self_attn.o_proj.weight", (s.hidden, q)),
            (p + "mlp.gate_proj.weight", (s.ffn, s.hidden)),
            (p + "mlp.up_proj.weight", (s.ffn, s.hidden)),
            (p + "mlp.down_proj.weight", (s.hidden, s.ffn)),
            (p + "input_layernorm.weight", (s.hidden,)),
            (p + "post_attention_layernorm.weight", (s.hidden,)),
        ]
    out.append(("model.norm.weight", (s.hidden,)))
    if not s.tied:
        out.append(("lm_head.weight", (s.vocab, s.hidden)))
    return out


def n_params(s: Shape) -> int:
    return sum(int(np.prod(shape)) for _, shape in tensor_specs(s))


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split like transformers' ``shard_checkpoint``: start a new shard when the next tensor
    would push the current one past ``max_bytes`` (a tensor larger than that gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def bf16_round_(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even; overwrites ``x``. Finite input only."""
    u = x.view(np.uint32)
    tmp = np.right_shift(u, 16)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(u, tmp, out=u)
    np.right_shift(u, 16, out=u)
    return u.astype(np.uint16)


def _write_tensor(f, h, name: str, shape: tuple[int, ...], seed: int, index: int, buf: np.ndarray) -> None:
    n = int(np.prod(shape))
    if name.endswith("norm.weight"):
        ones = np.full(min(n, CHUNK), 0x3F80, np.uint16)  # bf16 1.0
        for start in range(0, n, CHUNK):
            part = memoryview(ones[:min(CHUNK, n - start)])
            f.write(part)
            h.update(part)
        return
    rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, index])))
    scale = np.float32(INIT_STD)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = buf[:m]
        rng.standard_normal(m, dtype=np.float32, out=x)
        np.multiply(x, scale, out=x)
        bits = memoryview(bf16_round_(x))
        f.write(bits)
        h.update(bits)


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], index_of: dict[str, int],
                 seed: int, buf: np.ndarray) -> tuple[int, str]:
    """One safetensors file, header then raw bytes. Returns (bytes, sha256)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)  # the spec allows space padding; aligns the data section
    h = hashlib.sha256()
    with open(path, "wb") as f:
        head = struct.pack("<Q", len(hj)) + hj
        f.write(head)
        h.update(head)
        for name, shape in tensors:
            _write_tensor(f, h, name, shape, seed, index_of[name], buf)
    return 8 + len(hj) + off, h.hexdigest()


def _tokenizer_ids(tok_dir: Path) -> dict[str, int | None]:
    """bos / eos / pad ids of a tokenizer directory (for config.json)."""
    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = {a["content"]: int(a["id"]) for a in tj.get("added_tokens", [])}
    ids.update({k: int(v) for k, v in tj["model"]["vocab"].items()})
    out = {}
    for role in ("bos", "eos", "pad"):
        v = cfg.get(f"{role}_token")
        if isinstance(v, dict):
            v = v.get("content")
        out[role] = ids.get(v) if v is not None else None
    out["n_tokens"] = max(ids.values()) + 1
    return out


def resolve_tokenizer(spec: str | Path | None) -> Path | str:
    """``"tiny"``, or a directory holding the tokenizer files (default: SmolLM2's)."""
    if spec == "tiny":
        return "tiny"
    if spec is None:
        env = os.environ.get("EDGEQ_SMOLLM2")
        spec = Path(env) if env else SMOLLM2_DEFAULT
    d = Path(spec)
    missing = [n for n in TOKENIZER_FILES if not (d / n).is_file()]
    if missing:
        raise EdgeqError(f"tokenizer directory {d}: missing {', '.join(missing)} (make SmolLM2 with "
                         "`python -m models.smollm2`, point --tokenizer at it, or use --tokenizer tiny)")
    return d


def _write_tokenizer(tok: Path | str, out: Path) -> None:
    if tok == "tiny":
        from models.tiny import SPECIAL_TOKENS, build_tiny_tokenizer, save_tokenizer
        save_tokenizer(build_tiny_tokenizer("gpt2"), out, bos=SPECIAL_TOKENS[0], eos=SPECIAL_TOKENS[2],
                       pad=SPECIAL_TOKENS[0], add_bos=True)
        return
    for n in TOKENIZER_FILES:
        shutil.copyfile(Path(tok) / n, out / n)


def hf_config(s: Shape, ids: dict, rope_scaling: bool) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": s.ffn,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": s.tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": s.vocab,
    }
    if ids.get("pad") is not None:
        cfg["pad_token_id"] = ids["pad"]
    if rope_scaling:
        cfg["rope_scaling"] = {"factor": s.rope_factor, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    return cfg


def make_scale(out_dir: Path, shape: str | Shape = "llama-3.2-1b", *, seed: int = 0, layers: int | None = None,
               tokenizer: str | Path | None = None, max_shard_bytes: int = 4 * GIB,
               rope_scaling: bool = False, log=None) -> Path:
    """Write the random checkpoint to ``out_dir`` (created, or replacing a previous output)."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise EdgeqError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        s = SHAPES[shape]
        shape_name = shape
    else:
        s, shape_name = shape, "custom"
    if layers is not None:
        if layers < 1:
            raise EdgeqError(f"--layers must be >= 1, got {layers}")
        s = replace(s, layers=layers)
    if max_shard_bytes < 1:
        raise EdgeqError(f"max shard size must be positive, got {max_shard_bytes} bytes")
    tok = resolve_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    specs = tensor_specs(s)
    index_of = {name: i for i, (name, _) in enumerate(specs)}
    shards = plan_shards(specs, max_shard_bytes)
    files: dict[str, dict] = {}
    buf = np.empty(CHUNK, np.float32)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        _write_tokenizer(tok, tmp)
        ids = _tokenizer_ids(tmp)
        if ids["n_tokens"] > s.vocab:
            raise EdgeqError(f"tokenizer has {ids['n_tokens']} tokens, more than the shape's vocab {s.vocab}")
        write_json(tmp / "config.json", hf_config(s, ids, rope_scaling))
        gen = {k: v for k, v in (("bos_token_id", ids["bos"]), ("eos_token_id", ids["eos"]),
                                 ("pad_token_id", ids["pad"])) if v is not None}
        write_json(tmp / "generation_config.json", gen)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map: dict[str, str] = {}
        for fname, tensors in zip(names, shards):
            nbytes, digest = _write_shard(tmp / fname, tensors, index_of, seed, buf)
            files[fname] = {"bytes": nbytes, "sha256": digest}
            weight_map.update({name: fname for name, _ in tensors})
            if log:
                log(f"scale: wrote {fname} ({nbytes / GIB:.2f} GiB, {time.perf_counter() - t0:.0f} s)")
        if len(shards) > 1:
            total = sum(2 * int(np.prod(shape)) for _, shape in specs)
            write_json(tmp / "model.safetensors.index.json",
                       {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        for p in sorted(tmp.iterdir()):  # the small files (shards were hashed while written)
            if p.is_file() and p.name not in files:
                files[p.name] = {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        info = {"recipe": RECIPE, "shape": shape_name, "dims": asdict(s), "seed": seed,
                "params": n_params(s), "tokenizer": "tiny" if tok == "tiny" else "smollm2",
                "llama3_rope_scaling": rope_scaling, "files": dict(sorted(files.items()))}
        (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path, required=True, help="output directory (created or replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--tokenizer", default=None,
                    help="directory with SmolLM2's tokenizer files (default $EDGEQ_SMOLLM2 or "
                         f"{SMOLLM2_DEFAULT}), or 'tiny'")
    ap.add_argument("--max-shard-gib", type=float, default=4.0, help="largest shard, GiB (default 4)")
    ap.add_argument("--llama3-rope-scaling", action="store_true",
                    help="write the release's llama3 rope_scaling into config.json (edgeq refuses it today)")
    args = ap.parse_args(argv)

    def body() -> None:
        t0 = time.perf_counter()
        out = make_scale(args.out, args.shape, seed=args.seed, layers=args.layers, tokenizer=args.tokenizer,
                         max_shard_bytes=int(args.max_shard_gib * GIB), rope_scaling=args.llama3_rope_scaling,
                         log=lambda m: print(m, flush=True))
        print(f"scale: wrote {args.shape} to {out} in {time.perf_counter() - t0:.0f} s")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())

"""ModelIR -> TVM artifact: a compiled kernel library + packed weights, run by runtimes/tvmrt.py.

Files:

* ``kernels.so`` — the generated kernels (:mod:`edgeq.kernels`) compiled for the profile's
  ``[compile] tvm_target`` (x86 through LLVM here; aarch64 cross-linked with
  ``aarch64-linux-gnu-gcc``; CUDA as a module carrying its kernel source). It is code: its
  sha256 is in the manifest and the runtime refuses a library that does not match.
* ``weights.safetensors`` — per layer four quantized matmuls in the kernels' blocked layout:
  ``qkv`` (Q, K, V stacked: one call), ``o``, ``gate_up`` (gate and up interleaved block by
  block, so the first ``2 f`` outputs are gate[:f] and up[:f] — a pruned MLP width is a prefix),
  ``down`` (a pruned width is a prefix of its inputs); the low-rank branches of a matmul (LoRA,
  error compensation) as one ``A``/``B`` pair (stacked, block-diagonal for stacked matmuls) fused
  into its kernel; norms (Gemma's QK-norms and sandwich norms too); RoPE pair order; the int8 head / embedding table; with bias
  compensation (``--prune-bias``) per layer ``o.rate_bias`` / ``down.rate_bias``, (rates, hidden)
  float32, whose row for the current rate the runtime adds after the o / down kernels.
* ``tokenizer.spec.json``, and for SentencePiece-style vocabularies ``tokenizer.vocab.safetensors``
  (the vocabulary as arrays the session memory-maps: ``edgeq.tokenizer_pack``).

The decoder around the kernels (RMSNorm, RoPE with per-KV-group gathered frequencies, attention
over the KV cache, SwiGLU / GeGLU, the residual adds, per-rate masks of Q/K pairs and V/O
components; Gemma 3's QK-norm, sandwich norms, embedding scale and sliding windows) of a decode
token is compiled too, into the same library, listed in the manifest's ``tvm.decoder``: on CPU
targets as LLVM functions (:mod:`edgeq.kernels.tir_decoder`), on CUDA targets as GPU kernels of the
same names and arguments (:mod:`edgeq.kernels.tir_decoder_cuda`). A token is then an embedding
call, a norm, eight calls per layer and the head, no numpy. Prefill keeps the numpy decoder of the
runtime; a CUDA artifact needs a GPU runtime, which runtimes/tvmrt.py is not (it refuses them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm import tqdm

from edgeq.artifact import write_tokenizer_spec
from edgeq.tokenizer_pack import VOCAB_FILE, write_packed
from edgeq.errors import EdgeqError
from edgeq.hashing import sha256_file
from edgeq.ir import Linear, ModelIR, Role, block_norm_names
from edgeq.kernels import compile as kc
from edgeq.kernels import layout
from edgeq.kernels.compile import kernel_block
from edgeq.kernels.spec import KernelSpec
from edgeq.kernels.tir_decoder import ACTS as DECODER_ACTS
from edgeq.kernels.tir_decoder import LANES, DecoderSpec
from edgeq.passes.prune_bias import rate_bias_tables
from edgeq.quant.intgroup import dequantized, fit_format, rtn_int
from edgeq.safetensors_writer import SafetensorsWriter
from edgeq.streaming import ordered_map, row_ranges

LIBRARY = "kernels.so"
WEIGHTS = "weights.safetensors"
TOKENIZER_FILE = "tokenizer.spec.json"
GROUPS = ("qkv", "o", "gate_up", "down")
# Alignment of the weights file's data section (runtimes/tvmrt.py WEIGHT_ALIGN: TVM's from_dlpack
# requires 64); tensor sizes are multiples of 64 bytes in practice, so every tensor is aligned.
WEIGHTS_ALIGN = 64


@dataclass(frozen=True)
class TvmOptions:
    bits: int = 4  # block linears (4 or 8); the head / embedding are 8-bit
    group: int = 32
    target: Mapping = dataclasses.field(default_factory=lambda: {"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                                                  "mcpu": "haswell"})
    # low-rank factors stored in float16 (half the bytes; the branch then costs <= 15 % of a
    # cached GEMV, docs/benchmarks.md) and computed in float32
    lr_dtype: str = "float16"
    # float32, or int8: activations quantized per group, integer dot products (the profile's
    # [deploy] tvm_activations; the block linears' kernels, and the head's but on AVX2 (head_act);
    # edgeq.kernels.tir_dot)
    act: str = "float32"

    @property
    def head_act(self) -> str:
        """The 8-bit head / embedding kernels' activations: ``act``, except float32 where the int8
        products are AVX2's ``vpmaddubsw`` pair — 8-bit codes need its sign trick there (three more
        instructions per 32 codes) and that kernel measured 0.66-0.79x the float one on the
        49152x576 head (docs/benchmarks.md, "int8 on AVX2"), while 4-bit ones gain 1.4-2.6x."""
        if self.act == "int8" and kc.dot_isa(self.target) == "avx2":
            return "float32"
        return self.act

    def to_json(self) -> dict:
        return {"bits": self.bits, "group": self.group, "target": dict(self.target), "lr_dtype": self.lr_dtype,
                "act": self.act}


def _format(bits: int, group: int, k: int) -> str:
    return fit_format(f"int{bits}_g{group}_sym", k).name


def _stack_low_rank(lins: list[Linear], rows: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """All branches of ``lins`` (stacked by output rows) as one (A (R, K), B (N, R)) pair,
    scales folded into B; B block-diagonal over the stacked linears. ``rows``: per linear, the
    order of its output rows in the stack (default natural)."""
    parts = [(i, lr) for i, lin in enumerate(lins) for lr in lin.low_rank]
    if not parts:
        return None
    outs = [lin.out_features for lin in lins]
    offs = np.concatenate([[0], np.cumsum(outs)])
    a = np.concatenate([lr.a for _, lr in parts]).astype(np.float32)
    b = np.zeros((int(offs[-1]), a.shape[0]), np.float32)
    r0 = 0
    for i, lr in parts:
        bb = (lr.b * np.float32(lr.scale)).astype(np.float32)
        b[offs[i]:offs[i + 1], r0:r0 + lr.rank] = bb
        r0 += lr.rank
    return a, b


def interleave_rows(f: int, block: int) -> np.ndarray:
    """Row order of the stacked [gate; up] (2f rows) that alternates blocks: gate block 0, up
    block 0, gate block 1, ..."""
    nb = f // block
    idx = np.arange(2 * f).reshape(2, nb, block)  # (gate|up, block, lane)
    return idx.transpose(1, 0, 2).reshape(-1)


def matmul_groups(ir: ModelIR, layer: int, block: int, names=GROUPS) -> dict[str, tuple[np.ndarray, tuple | None]]:
    """The layer's four kernel matmuls: name -> (float weight (N, K), low-rank (A, B) or None);
    ``names``: only these."""
    out = {}
    for name in names:
        rows, lr = group_rows(ir, layer, name, block)
        out[name] = (rows(0, group_dims(ir, layer)[name][0]), lr)
    return out


def group_rows(ir: ModelIR, layer: int, name: str, block: int):
    """One kernel matmul of the layer as (``rows(r0, r1)``: float32 rows ``[r0, r1)`` of its
    stacked weight, read on demand (for ``gate_up``, ``r0`` and ``r1`` multiples of
    ``2 * block``), low-rank (A, B) or None)."""
    q, k, v, o = (ir.linear(layer, r) for r in (Role.Q, Role.K, Role.V, Role.O))
    gate, up, down = (ir.linear(layer, r) for r in (Role.GATE, Role.UP, Role.DOWN))
    if name == "gate_up":  # gate block j, up block j, gate block j + 1, ... (interleave_rows)
        def rows(r0, r1):
            g, u = (np.asarray(lin.weight[r0 // 2:r1 // 2], np.float32) for lin in (gate, up))
            nb = (r1 - r0) // (2 * block)
            return np.stack([g.reshape(nb, block, -1), u.reshape(nb, block, -1)], axis=1).reshape(r1 - r0, -1)

        gu_lr = _stack_low_rank([gate, up])
        if gu_lr is not None:
            gu_lr = (gu_lr[0], gu_lr[1][interleave_rows(gate.out_features, block)])
        return rows, gu_lr
    lins = {"qkv": [q, k, v], "o": [o], "down": [down]}[name]

    def rows(r0, r1):  # rows of the row-stacked weights
        out, at = [], 0
        for lin in lins:
            a, b = max(r0, at), min(r1, at + lin.out_features)
            if a < b:
                out.append(np.asarray(lin.weight[a - at:b - at], np.float32))
            at += lin.out_features
        return out[0] if len(out) == 1 else np.concatenate(out)

    return rows, _stack_low_rank(lins)


def group_dims(ir: ModelIR, layer: int) -> dict[str, tuple[int, int, int]]:
    """The layer's four kernel matmuls as name -> (outputs N, inputs K, low-rank rank), from
    shapes alone (no weight is read)."""
    q, k, v, o = (ir.linear(layer, r) for r in (Role.Q, Role.K, Role.V, Role.O))
    gate, up, down = (ir.linear(layer, r) for r in (Role.GATE, Role.UP, Role.DOWN))

    def rank(lins):
        return sum(lr.rank for lin in lins for lr in lin.low_rank)

    return {
        "qkv": (q.out_features + k.out_features + v.out_features, q.in_features, rank([q, k, v])),
        "o": (o.out_features, o.in_features, rank([o])),
        "gate_up": (gate.out_features + up.out_features, gate.in_features, rank([gate, up])),
        "down": (down.out_features, down.in_features, rank([down])),
    }


def biases(ir: ModelIR, layer: int) -> dict[str, np.ndarray]:
    q, k, v = (ir.linear(layer, r) for r in (Role.Q, Role.K, Role.V))
    out = {}
    if q.bias is not None or k.bias is not None or v.bias is not None:
        out["qkv"] = np.concatenate([(lin.bias if lin.bias is not None else np.zeros(lin.out_features, np.float32))
                                     for lin in (q, k, v)]).astype(np.float32)
    for name, role in (("o", Role.O), ("down", Role.DOWN)):
        if ir.linear(layer, role).bias is not None:
            out[name] = ir.linear(layer, role).bias.astype(np.float32)
    gate, up = ir.linear(layer, Role.GATE), ir.linear(layer, Role.UP)
    if gate.bias is not None or up.bias is not None:
        F = gate.out_features
        gb = gate.bias if gate.bias is not None else np.zeros(F, np.float32)
        ub = up.bias if up.bias is not None else np.zeros(F, np.float32)
        out["gate_up"] = np.concatenate([gb, ub]).astype(np.float32)  # natural order; interleaved by the caller
    return out


def check(ir: ModelIR, opts: TvmOptions) -> list[str]:
    problems = []
    block = kernel_block(opts.target)
    hp = ir.hparams
    if opts.bits not in (4, 8):
        problems.append(f"the tvm format stores int4 or int8 weights, got {opts.bits} bits")
    if opts.act == "int8" and kc.dot_isa(opts.target) is None:
        problems.append(f"int8 activations need integer dot products (AVX-512 VNNI, AVX-VNNI, AVX2, aarch64 "
                        f"dotprod); target {dict(opts.target)} has none")
    for name, n in (("hidden", hp.hidden_size), ("ffn", hp.intermediate_size), ("vocab", hp.vocab_size),
                    ("q|k|v", (hp.num_heads + 2 * hp.num_kv_heads) * hp.head_dim)):
        if n % block:
            problems.append(f"{name} width {n} is not a multiple of the kernel block {block}")
    if ir.prune is not None:
        g = max(opts.group, block)
        bad = sorted({w.ffn for r in ir.prune.rates for w in ir.prune.widths[r] if w.ffn % block or w.ffn % opts.group})
        if bad:
            problems.append(f"pruned MLP widths {bad[:3]} are not multiples of the kernel block {block} and group "
                            f"{opts.group} (build with a prune granularity that is a multiple of {g})")
    return problems


def decoder_spec(ir: ModelIR, opts: TvmOptions) -> DecoderSpec | None:
    """The compiled decoder of a decode token (CPU or CUDA form, by target), or None where the
    runtime's numpy decoder runs it (activations or widths the compiled functions do not take)."""
    hp = ir.hparams
    if hp.hidden_act not in DECODER_ACTS:
        return None
    if hp.hidden_size % LANES or hp.head_dim % LANES or hp.num_heads % hp.num_kv_heads:
        return None
    return DecoderSpec(hidden=hp.hidden_size, heads=hp.num_heads, kv_heads=hp.num_kv_heads, head_dim=hp.head_dim,
                       block=kc.kernel_block(opts.target), dot_layout=opts.head_act == "int8", act=hp.hidden_act,
                       qk_norm=hp.qk_norm, sandwich=hp.sandwich_norm)


def specs_for(ir: ModelIR, opts: TvmOptions) -> set:
    """Every kernel the model needs (decode and prefill forms)."""
    block = kernel_block(opts.target)
    out = set()
    hp = ir.hparams
    for i in range(hp.num_layers):
        for name, (_, k, rank) in group_dims(ir, i).items():
            fmt = _format(opts.bits, opts.group, k)
            g = int(fmt.split("_g")[1].split("_")[0])
            for prefill in (False, True):
                out.add(KernelSpec(bits=opts.bits, group=g, rank=rank, block=block,
                                   lr_dtype=opts.lr_dtype, act=opts.act,
                                   prefill=prefill))
    g = int(_format(8, opts.group, hp.hidden_size).split("_g")[1].split("_")[0])
    out |= {KernelSpec(bits=8, group=g, block=block, prefill=p, act=opts.head_act) for p in (False, True)}
    return out


def _pack(w: np.ndarray, lr, bits: int, group: int, block: int, lr_dtype: str = "float32", act: str = "float32"
          ) -> tuple[dict[str, np.ndarray], str]:
    fmt = _format(bits, group, w.shape[1])
    t = rtn_int(w, fmt)
    spec = KernelSpec(bits=bits, group=t.fmt.group, rank=0 if lr is None else lr[0].shape[0], block=block,
                      lr_dtype=lr_dtype, act=act)
    arrays = layout.pack_weight(t.codes, t.scales, None, spec)
    if lr is not None:
        arrays.update(layout.pack_low_rank(lr[0], lr[1], spec))
    return arrays, spec.name.rsplit("_", 1)[0]  # the spec name without _decode / _prefill


def _packed_shapes(n: int, k: int, rank: int, bits: int, group: int, block: int, lr_dtype: str = "float32",
                   act: str = "float32") -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of the arrays :func:`_pack` makes for an (n, k) weight with a
    rank-``rank`` low-rank branch (0: none), from the shapes alone."""
    g = int(_format(bits, group, k).split("_g")[1].split("_")[0])
    qw = (n // block, k * bits // 32, 4 * block) if act == "int8" else (n // block, k * bits // 8, block)
    out = {"qw": (np.dtype(np.uint8), qw),
           "sc": (np.dtype(np.float32), (n // block, k // g, block))}
    if rank:
        out["a"] = (np.dtype(lr_dtype), (k, rank))
        out["b"] = (np.dtype(lr_dtype), (n // block, rank, block))
    return out


def _write_packed(st, prefix: str, rows, n: int, k: int, lr, bits: int, group: int, block: int,
                  lr_dtype: str = "float32", act: str = "float32") -> str:
    """Quantize and pack an (n, k) weight (``rows(r0, r1)`` reads its rows) one row chunk at a
    time (row blocks lead the kernels' layout, and group quantization is per row, so the chunks
    are slices of the whole-tensor packing), and its low-rank branch (small) whole; returns the
    kernel name."""
    def chunk(r):
        return r[0], _pack(rows(*r), None, bits, group, block, lr_dtype, act)

    kname = None
    for r0, (packed, kname) in ordered_map(chunk, row_ranges(n, k, multiple=2 * block)):
        for key, v in packed.items():
            st.write(f"{prefix}.{key}", v, start=r0 // block)
    if lr is None:
        return kname
    g = int(_format(bits, group, k).split("_g")[1].split("_")[0])
    spec = KernelSpec(bits=bits, group=g, rank=lr[0].shape[0], block=block, lr_dtype=lr_dtype, act=act)
    for key, v in layout.pack_low_rank(lr[0], lr[1], spec).items():
        st.write(f"{prefix}.{key}", v)
    return spec.name.rsplit("_", 1)[0]  # as _pack names it


def write_tvm(ir: ModelIR, out_dir: Path, opts: TvmOptions, progress: bool = False) -> dict:
    """Write ``kernels.so``, ``weights.safetensors``, ``tokenizer.spec.json`` (and
    ``tokenizer.vocab.safetensors`` where the vocabulary packs); returns the manifest's ``tvm`` section."""
    problems = check(ir, opts)
    if problems:
        raise EdgeqError(f"cannot lower to tvm: {problems[0]}")
    out_dir = Path(out_dir)
    block = kc.kernel_block(opts.target)
    hp = ir.hparams
    heads = ("token_embd",) + (() if hp.tie_word_embeddings else ("output",))
    # streamed: every array's shape first (the safetensors header), then one matmul group (one
    # row chunk of the embedding / head) packed and written at a time
    shapes: dict[str, tuple] = {}
    small: dict[str, np.ndarray] = {}  # biases, norms, RoPE order: a few vectors per layer
    half = hp.head_dim // 2
    for i in range(hp.num_layers):
        for name, (n, k, rank) in group_dims(ir, i).items():
            for key, spec in _packed_shapes(n, k, rank, opts.bits, opts.group, block, opts.lr_dtype, opts.act).items():
                shapes[f"blk.{i}.{name}.{key}"] = spec
        for name, b in biases(ir, i).items():
            if name == "gate_up":
                b = b[interleave_rows(hp.intermediate_size, block)]
            small[f"blk.{i}.{name}.bias"] = b
        for norm in block_norm_names(hp):  # attn_norm, ffn_norm (+ Gemma's QK and sandwich norms)
            small[f"blk.{i}.{norm}"] = ir.tensors[f"blk.{i}.{norm}"].astype(np.float32)
        idx = ir.rope_index.get(i)
        small[f"blk.{i}.rope_index"] = (np.tile(np.arange(half), (hp.num_kv_heads, 1)) if idx is None
                                        else np.asarray(idx)).astype(np.int64)
    small["output_norm"] = ir.tensors["output_norm"].astype(np.float32)
    # bias compensation (--prune-bias): (rates, hidden) per layer and projection, through the stored weights
    tables = rate_bias_tables(ir, linear=lambda i, r: lowered_linear(ir.linear(i, r), opts))
    if tables is not None:
        for i in range(hp.num_layers):
            for which, name in enumerate(("o", "down")):
                t = np.stack([tables[r][i, which] for r in ir.prune.rates]).astype(np.float32)
                if t.any():
                    small[f"blk.{i}.{name}.rate_bias"] = t
    for name in heads:
        n, k = ir.tensors[name].shape
        for key, spec in _packed_shapes(n, k, 0, 8, opts.group, block, act=opts.head_act).items():
            shapes[f"{name}.{key}"] = spec
    shapes.update({name: (a.dtype, a.shape) for name, a in small.items()})
    kernels: dict[str, str] = {}
    layers = range(hp.num_layers)
    if progress:
        layers = tqdm(layers, desc="tvm weights", unit="layer", leave=False)
    # the data section 64-byte aligned (WEIGHTS_ALIGN): the runtime memory-maps the file and hands
    # aligned arrays to the kernels in place (TVM's DLPack import requires 64-byte alignment)
    with SafetensorsWriter(out_dir / WEIGHTS, shapes, align=WEIGHTS_ALIGN) as st:
        for name, a in small.items():
            st.write(name, np.ascontiguousarray(a))
        for i in layers:
            for name in GROUPS:
                n, k, _ = group_dims(ir, i)[name]
                rows, lr = group_rows(ir, i, name, block)
                kernels[f"blk.{i}.{name}"] = _write_packed(st, f"blk.{i}.{name}", rows, n, k, lr, opts.bits,
                                                           opts.group, block, opts.lr_dtype, opts.act)
        for name in heads:
            t = ir.tensors[name]
            kernels[name] = _write_packed(st, name, lambda r0, r1: np.asarray(t[r0:r1], np.float32), *t.shape,
                                          None, 8, opts.group, block, act=opts.head_act)
    specs = sorted(specs_for(ir, opts), key=lambda s: s.name)
    dec = decoder_spec(ir, opts)
    ex = kc.build(specs, opts.target, () if dec is None else (dec,))
    kc.export(ex, out_dir / LIBRARY, opts.target)
    if ir.tokenizer is not None:
        write_tokenizer_spec(ir.tokenizer, out_dir / TOKENIZER_FILE)
    # SentencePiece-style vocabularies also as arrays a session memory-maps (runtimes.spm_bpe)
    vocab_file = VOCAB_FILE if ir.tokenizer is not None and write_packed(ir.tokenizer, out_dir / VOCAB_FILE) else None
    return {"library": LIBRARY, "library_sha256": sha256_file(out_dir / LIBRARY), "weights_file": WEIGHTS, "target": dict(opts.target), "block": block,
            "bits": opts.bits, "group": opts.group, "lr_dtype": opts.lr_dtype, "act": opts.act,
            "head_act": opts.head_act, "kernels": dict(sorted(kernels.items())),
            "functions": [s.name for s in specs],  # the matmul kernels; the decoder's functions in "decoder"
            **({"decoder": dec.names()} if dec is not None else {}),
            "tokenizer_file": TOKENIZER_FILE if ir.tokenizer is not None else None,
            **({"tokenizer_vocab_file": vocab_file} if vocab_file else {})}


def lowered_linear(lin: Linear, opts: TvmOptions) -> Linear:
    """One block linear as the artifact stores it: its int-group values, low-rank factors rounded to
    their storage dtype (scale folded into B)."""
    def factors(lr):  # as stored: A and s*B rounded to the factor dtype
        if opts.lr_dtype == "float32":
            return lr
        dt, s = np.dtype(opts.lr_dtype), np.float32(lr.scale)
        return dataclasses.replace(lr, a=lr.a.astype(dt).astype(np.float32), b=(lr.b * s).astype(dt).astype(np.float32),
                                   scale=1.0)

    return dataclasses.replace(lin, weight=dequantized(lin.weight, _format(opts.bits, opts.group, lin.in_features)),
                               packed=None, low_rank=tuple(factors(lr) for lr in lin.low_rank))


def lowered_ir(ir: ModelIR, opts: TvmOptions) -> ModelIR:
    """The float model a TVM artifact computes: every block linear as its int-group values (the
    head / embedding at int8), low-rank factors rounded to their storage dtype (scale folded into B)."""
    linears = {n: lowered_linear(lin, opts) for n, lin in ir.linears.items()}
    tensors = dict(ir.tensors)
    for name in ("token_embd",) + (() if ir.hparams.tie_word_embeddings else ("output",)):
        tensors[name] = dequantized(ir.tensors[name], _format(8, opts.group, ir.hparams.hidden_size))
    return ir.replace(linears=linears, tensors=tensors)


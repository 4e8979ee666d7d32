"""ModelIR <-> GGUF (llama.cpp), and LowRank branches -> llama.cpp LoRA-adapter GGUF.

Public API
----------
* :func:`check` — problems that stop a ModelIR (and optionally a type plan) from becoming a
  GGUF that stock llama.cpp loads.
* :func:`tensor_types` — the per-tensor type plan for a bit width / base format, following
  ``llama_model_quantize``'s own choices (see its docstring for the rule).
* :func:`write_gguf` — model GGUF (deterministic, atomic).
* :func:`write_lora_gguf` — one adapter's LowRank branches as a llama.cpp LoRA adapter.
* :func:`read_gguf` — GGUF model file -> ModelIR (the GGUF front end).

Facts this module relies on (checked against llama.cpp as vendored by llama-cpp-python 0.3.36
and gguf-py 0.19):

* llama.cpp's ``llama`` architecture applies RoPE to adjacent pairs ``(2j, 2j+1)`` (rope type
  NORM) while Hugging Face Llama rotates halves ``(j, j + d/2)``; ``convert_hf_to_gguf.py``
  therefore permutes the rows of Q and K (per head) on the way in. We do the same (also to Q/K
  biases and to LoRA ``B`` matrices of Q/K) and undo it in :func:`read_gguf`. The ``qwen2``
  architecture uses rope type NEOX (rotate-half), so no permutation.
* gguf-py writes numpy arrays with the last axis as ggml's ``ne[0]``, so a ``(out, in)`` weight
  is a ggml ``[in, out]`` tensor, exactly what llama.cpp expects; quantized rows run along
  ``in``.
* LoRA adapters (``src/llama-adapter.cpp``): ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``general.architecture`` equal to the model's, float32
  ``adapter.lora.alpha``; tensors ``<base tensor name>.lora_a`` with ne ``[in, rank]`` (numpy
  ``(rank, in)``) and ``<base tensor name>.lora_b`` with ne ``[rank, out]`` (numpy
  ``(out, rank)``); the applied scale is ``alpha / rank`` (rank = ``lora_b.ne[0]``), or 1 when
  ``alpha == 0``, times the runtime adapter scale.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from edgeq.artifact import atomic_write_file
from edgeq.errors import EdgeqError, require
from edgeq.hashing import sha256_file
from edgeq.ir import (
    Arch,
    HParams,
    Linear,
    LowRank,
    ModelIR,
    Role,
    TokenizerSpec,
    linear_name,
)
from edgeq.quant import native
from edgeq.quant import storage
from edgeq.quant.formats import FORMATS, QType, as_qtype
from edgeq.quant.reference import dequantize, quantize

__all__ = [
    "GGUF_ARCH",
    "LLAMA_FTYPE",
    "check",
    "tensor_types",
    "llamacpp_output_type",
    "write_gguf",
    "write_lora_gguf",
    "read_gguf",
    "gguf_tensor_name",
    # shared with gguf_rates.py (GGUF at a pruning rate)
    "ROLE_ORDER",
    "base_type_of_plan",
    "rotate_half_to_interleaved",
    "write_model_header",
    "write_tensors",
]

# Arch -> general.architecture
GGUF_ARCH: dict[Arch, str] = {Arch.LLAMA: "llama", Arch.QWEN2: "qwen2"}
_ARCH_FROM_GGUF: dict[str, Arch] = {v: k for k, v in GGUF_ARCH.items()}

# enum llama_ftype (general.file_type) for the base types we write
LLAMA_FTYPE: dict[QType, int] = {QType.F32: 0, QType.F16: 1, QType.Q4_0: 2, QType.Q4_1: 3, QType.Q8_0: 7,
                                 QType.Q5_0: 8, QType.Q5_1: 9, QType.Q4_K: 15, QType.Q6_K: 18}
# (general.file_type is informational for llama.cpp; Q4_K/Q6_K map to MOSTLY_Q4_K_M / MOSTLY_Q6_K)

# bits -> base type of the block linears: what --bits means for gguf in the storage-type registry
_BITS: dict[int, QType] = {b: QType(storage.for_bits("gguf", b).name) for b in storage.bits_choices("gguf")}

# tokenizer.ggml.pre values llama.cpp (llama-vocab.cpp) accepts for BPE vocabularies that our
# front end produces. "default" and "gpt-2" are generic byte-level BPE pre-tokenizers.
KNOWN_PRE = frozenset({
    "default", "gpt-2", "smollm", "qwen2", "llama3", "llama-bpe", "starcoder", "refact", "olmo",
    "dbrx", "smaug-bpe", "deepseek-llm", "deepseek-coder", "falcon", "mpt", "jina-v2-code",
})

ROLE_ORDER = (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)
_QK = (Role.Q, Role.K)
_GGML_Q6_K_BLOCK = 256

# llama.cpp token type "unused", for padding the vocabulary up to the embedding rows
_TOKEN_UNUSED = 5


# --------------------------------------------------------------------------------------------
# names, permutations
# --------------------------------------------------------------------------------------------

def gguf_tensor_name(ir_name: str) -> str:
    """IR name -> GGUF tensor name: ``blk.0.attn_q`` -> ``blk.0.attn_q.weight``;
    ``blk.0.attn_q.bias`` stays as it is."""
    return ir_name if ir_name.endswith(".bias") else f"{ir_name}.weight"


def _heads_for(hp: HParams, role: Role) -> int:
    return hp.num_heads if role == Role.Q else hp.num_kv_heads


def rotate_half_to_interleaved(x: np.ndarray, n_head: int) -> np.ndarray:
    """Permute rows (axis 0) per head from HF rotate-half order to llama.cpp's adjacent pairs
    (``LlamaModel.permute`` in convert_hf_to_gguf.py)."""
    rest = x.shape[1:]
    hd = x.shape[0] // n_head
    return np.ascontiguousarray(x.reshape(n_head, 2, hd // 2, *rest).swapaxes(1, 2).reshape(x.shape))


def _interleaved_to_rotate_half(x: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`rotate_half_to_interleaved`."""
    rest = x.shape[1:]
    hd = x.shape[0] // n_head
    return np.ascontiguousarray(x.reshape(n_head, hd // 2, 2, *rest).swapaxes(1, 2).reshape(x.shape))


def _needs_permute(arch: Arch, role: Role) -> bool:
    return arch == Arch.LLAMA and role in _QK


def _out_rows(ir: ModelIR, lin: Linear, x: np.ndarray) -> np.ndarray:
    """Rows of an output-side array (weight, bias, LoRA B) in llama.cpp order."""
    if _needs_permute(ir.arch, lin.role):
        return rotate_half_to_interleaved(x, _heads_for(ir.hparams, lin.role))
    return x


# --------------------------------------------------------------------------------------------
# type plan
# --------------------------------------------------------------------------------------------

def _base_qtype(bits: int | QType | str) -> QType:
    if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool):
        if int(bits) not in _BITS:
            raise EdgeqError(f"GGUF: expected bits in {sorted(_BITS)} or a type in "
                             f"{[q.value for q in QType]}, got {bits}")
        return _BITS[int(bits)]
    qt = as_qtype(bits)
    storage.check_storable([qt.value], "gguf", "GGUF: ")
    return qt


def _is_quantized(qt: QType) -> bool:
    return FORMATS[qt].block_size > 1


def llamacpp_output_type(hidden_size: int, base: QType | str | int) -> str:
    """The ggml type name ``llama_model_quantize`` gives ``output.weight`` (and the tied
    ``token_embd.weight``) for a file whose default type is ``base``, with no overrides.

    Mirrors ``llama_tensor_get_type_impl`` + ``tensor_type_fallback`` (src/llama-quant.cpp):
    non-quantized base -> base; ``hidden % block(base) != 0`` -> Q8_0; base Q8_0 -> Q8_0;
    otherwise Q6_K, which falls back to Q8_0 when ``hidden % 256 != 0``.
    """
    qt = _base_qtype(base)
    if not _is_quantized(qt):
        return qt.value
    if hidden_size % FORMATS[qt].block_size:
        t = "Q8_0"
    elif qt == QType.Q8_0:
        t = "Q8_0"
    else:
        t = "Q6_K"
    if t == "Q6_K" and hidden_size % _GGML_Q6_K_BLOCK:
        t = "Q8_0"
    return t


def _match_override(name: str, overrides: Mapping[str, Any]) -> Any | None:
    if name in overrides:
        return overrides[name]
    for pat, val in overrides.items():
        if pat.startswith("re:") and re.fullmatch(pat[3:], name):
            return val
    return None


def tensor_types(ir: ModelIR, bits: int | QType | str,
                 overrides: Mapping[str, int | QType | str] | None = None) -> dict[str, QType]:
    """Per-tensor storage types for :func:`write_gguf`, keyed by IR name.

    Keys: every linear (``blk.N.attn_q`` ...), ``token_embd``, ``output`` (untied only), the
    norms, and ``blk.N.attn_q.bias`` etc. for biases. ``bits``: 32 -> F32, 16 -> F16,
    8 -> Q8_0, 4 -> Q4_0, or an explicit base type (``QType.Q4_1`` / ``"Q4_1"`` ...).

    The rule (what ``llama_model_quantize`` does for the ftype of that base type on a
    Llama/Qwen2 model with no imatrix, verified by tests/backends/gguf/test_lower.py against
    llama-cpp-python 0.3.36):

    * 1-D tensors (norms, biases) stay F32.
    * Every block linear (attn_q/k/v/output, ffn_gate/up/down) gets the base type: for the
      legacy ftypes (Q4_0, Q4_1, Q8_0, F16, F32) llama.cpp bumps none of them (attn_v and
      ffn_down bumps only exist for K-quant/IQ ftypes, or Q4_0/Q5_0 *with* an imatrix).
    * ``output`` — and ``token_embd`` when the embeddings are tied (no ``output.weight``) —
      get :func:`llamacpp_output_type` (llama.cpp's ``llama_tensor_get_type_impl`` for the
      output category, then ``tensor_type_fallback``): Q8_0 if hidden is not a multiple of the
      base block size or the base is Q8_0; otherwise Q6_K, falling back to Q8_0 when hidden
      is not a multiple of 256 (Q6_K's block). So Llama-3.2-1B (hidden 2048) gets a **Q6_K**
      head under Q4_0/Q4_1, SmolLM2-135M (hidden 576, tied) a **Q8_0** one (the shipped
      SmolLM2-135M-Instruct.Q4_1.gguf has exactly that); Qwen2.5-0.5B (896) too.
    * An untied ``token_embd`` gets the base type.
    * F32/F16 bases: every 2-D tensor gets the base type.

    Same tensor types as llama.cpp's quantizer for every shape, hence the same file size
    (tested against llama_model_quantize). The tensor data is byte-identical to llama.cpp's
    for every type but Q6_K: edgeq's Q6_K is its own (deterministic) fit, not llama.cpp's
    iterative ``make_qx_quants`` search, so a Q6_K head has the same size and bits per weight
    (6.5625) but different bytes, with a rounding error of the same size (tested).

    ``overrides`` (2-D tensors only): exact IR name, then ``re:<regex>`` (full match), then
    ``_default`` (replaces the base for linears); first match wins. Values are bits or types.
    A linear whose ``in_features`` is not a multiple of the chosen type's block size is an
    error (llama.cpp has no fallback for the legacy types either).
    """
    base = _base_qtype(bits)
    overrides = dict(overrides or {})
    default = overrides.pop("_default", None)
    if default is not None:
        base = _base_qtype(default)
    hp = ir.hparams
    plan: dict[str, QType] = {}

    def pick(name: str, planned: QType, ncols: int) -> QType:
        ov = _match_override(name, overrides)
        qt = _base_qtype(ov) if ov is not None else planned
        bs = FORMATS[qt].block_size
        if ncols % bs:
            raise EdgeqError(f"GGUF: {name}: {qt.value} needs a row length that is a multiple of {bs}, "
                             f"got {ncols}")
        return qt

    out_q = QType(llamacpp_output_type(hp.hidden_size, base))
    plan["token_embd"] = pick("token_embd", out_q if hp.tie_word_embeddings else base, hp.hidden_size)
    for i in range(hp.num_layers):
        plan[f"blk.{i}.attn_norm"] = QType.F32
        for role in ROLE_ORDER:
            name = linear_name(i, role)
            lin = ir.linears.get(name)
            if lin is None:
                raise EdgeqError(f"GGUF: missing linear {name}")
            plan[name] = pick(name, base, lin.in_features)
            if lin.bias is not None:
                plan[f"{name}.bias"] = QType.F32
        plan[f"blk.{i}.ffn_norm"] = QType.F32
    plan["output_norm"] = QType.F32
    if not hp.tie_word_embeddings:
        plan["output"] = pick("output", out_q, hp.hidden_size)
    unknown = [k for k in overrides if not k.startswith("re:") and k not in plan]
    if unknown:
        raise EdgeqError(f"GGUF: override for unknown tensor(s) {unknown[:3]}")
    return plan


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------

def _tensor_plan_names(ir: ModelIR) -> dict[str, tuple[int, ...]]:
    """IR name -> numpy shape of every tensor write_gguf writes, in file order."""
    hp = ir.hparams
    out: dict[str, tuple[int, ...]] = {"token_embd": (hp.vocab_size, hp.hidden_size)}
    for i in range(hp.num_layers):
        out[f"blk.{i}.attn_norm"] = (hp.hidden_size,)
        for role in ROLE_ORDER:
            name = linear_name(i, role)
            lin = ir.linears[name]
            out[name] = tuple(lin.weight.shape)
            if lin.bias is not None:
                out[f"{name}.bias"] = tuple(lin.bias.shape)
        out[f"blk.{i}.ffn_norm"] = (hp.hidden_size,)
    out["output_norm"] = (hp.hidden_size,)
    if not hp.tie_word_embeddings:
        out["output"] = (hp.vocab_size, hp.hidden_size)
    return out


def check(ir: ModelIR, types: Mapping[str, QType | str] | None = None, *,
          allow_low_rank: bool = False, as_deci: bool = False) -> list[str]:
    """Problems that keep ``ir`` (with the type plan ``types``, if given) from being written as
    a GGUF stock llama.cpp loads. Empty list: good to go.

    LowRank branches count as a problem unless ``allow_low_rank`` (a model GGUF has no place
    for them; they ship as LoRA-adapter GGUFs via :func:`write_lora_gguf`)."""
    problems: list[str] = []
    hp = ir.hparams
    if hp.arch not in GGUF_ARCH:
        problems.append(f"architecture {getattr(hp.arch, 'value', hp.arch)!r} is not supported by the GGUF "
                        f"lowering (supported: {[a.value for a in GGUF_ARCH]})")
    try:
        ir.validate()
    except EdgeqError as exc:
        problems.append(str(exc))
        return problems
    if hp.head_dim % 2:
        problems.append(f"head_dim {hp.head_dim} is odd; RoPE needs an even head dimension")
    if hp.arch == Arch.QWEN2 and hp.num_heads * hp.head_dim != hp.hidden_size:
        problems.append(f"qwen2 in llama.cpp needs num_heads*head_dim == hidden_size, got "
                        f"{hp.num_heads}*{hp.head_dim} != {hp.hidden_size}")
    if hp.arch == Arch.QWEN2 and not as_deci and any(l.role == Role.O and l.bias is not None for l in ir.linears.values()):
        problems.append("llama.cpp's qwen2 architecture loads no attn_output bias (write it as 'deci', "
                        "see edgeq.backends.gguf.rates)")
    tok = ir.tokenizer
    if tok is None:
        problems.append("no tokenizer: a GGUF model needs tokenizer.ggml.* metadata")
    else:
        if tok.model != "gpt2":
            problems.append(f"tokenizer model {tok.model!r} is not supported (supported: 'gpt2')")
        if tok.pre not in KNOWN_PRE:
            problems.append(f"tokenizer pre {tok.pre!r} is unknown to llama.cpp "
                            f"(known here: {sorted(KNOWN_PRE)})")
        if len(tok.tokens) > hp.vocab_size:
            problems.append(f"tokenizer has {len(tok.tokens)} tokens but the embedding has only "
                            f"{hp.vocab_size} rows")
        if len(tok.token_types) != len(tok.tokens):
            problems.append(f"tokenizer has {len(tok.tokens)} tokens but {len(tok.token_types)} token types")
    for name, lin in ir.linears.items():
        if lin.low_rank and not allow_low_rank:
            srcs = sorted({lr.source for lr in lin.low_rank})
            problems.append(f"{name} has low-rank branches {srcs}: merge them or write them with "
                            f"write_lora_gguf (write_gguf(..., allow_low_rank=True))")
            break
    if types is not None:
        shapes = _tensor_plan_names(ir)
        unknown = sorted(set(types) - set(shapes))
        if unknown:
            problems.append(f"type plan names unknown tensors {unknown[:3]}")
        for name, shape in shapes.items():
            qt_raw = types.get(name, QType.F32)
            try:
                qt = as_qtype(qt_raw)
            except EdgeqError as exc:
                problems.append(f"{name}: {exc}")
                continue
            if len(shape) == 1 and qt != QType.F32:
                problems.append(f"{name}: 1-D tensors must be F32, got {qt.value}")
            elif shape[-1] % FORMATS[qt].block_size:
                problems.append(f"{name}: {qt.value} needs a row length that is a multiple of "
                                f"{FORMATS[qt].block_size}, got {shape[-1]}")
    return problems


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def _gguf():
    return require("gguf", "gguf")


def packed_rows(ir: ModelIR, lin: Linear, qt: QType) -> np.ndarray | None:
    """The linear's grid-exact packed bytes in llama.cpp row order, when it carries them in ``qt``.

    Checks that they still decode to ``lin.weight`` exactly (lossless lowering); a stale
    packing (the weight changed since) is an error rather than a silent mismatch."""
    p = lin.packed
    if p is None or as_qtype(p.qtype) != qt:
        return None
    if not np.array_equal(dequantize(p.data, qt, lin.weight.shape), np.asarray(lin.weight, dtype=np.float32)):
        raise EdgeqError(f"GGUF: {lin.name}: packed {qt.value} data no longer decodes to the weight "
                         "(a pass changed the weight after quantization)")
    return _out_rows(ir, lin, np.ascontiguousarray(p.data, dtype=np.uint8))


class _Raw:
    """Already-encoded GGML bytes for ``write_tensors`` (``array_of`` may return one)."""

    def __init__(self, data: np.ndarray, qt: QType):
        self.data, self.qt = data, qt


def _encode(arr: np.ndarray, qt: QType) -> tuple[np.ndarray, Any]:
    """(array to write, raw ggml type or None)."""
    gguf = _gguf()
    if isinstance(arr, _Raw):
        return np.ascontiguousarray(arr.data, dtype=np.uint8), gguf.GGMLQuantizationType[arr.qt.value]
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qt == QType.F32:
        return arr, None
    if qt == QType.F16:
        return arr.astype(np.float16), None
    if native.available() and qt in native.NATIVE_TYPES and arr.ndim == 2:
        data = native.quantize(arr, qt)  # ggml's own encoder: same bytes, faster (edgeq.quant.native)
    else:
        data = np.ascontiguousarray(quantize(arr, qt), dtype=np.uint8)
    return data, gguf.GGMLQuantizationType[qt.value]


def _add_kv(w, key: str, val: Any) -> None:
    gguf = _gguf()
    VT = gguf.GGUFValueType
    if isinstance(val, bool):
        w.add_bool(key, val)
    elif isinstance(val, (int, np.integer)):
        v = int(val)
        if 0 <= v < 2 ** 32:
            w.add_uint32(key, v)
        else:
            w.add_int64(key, v)
    elif isinstance(val, (float, np.floating)):
        w.add_float32(key, float(val))
    elif isinstance(val, str):
        w.add_key_value(key, val, VT.STRING)  # add_string drops empty strings
    elif isinstance(val, (list, tuple)):
        if not val:
            raise EdgeqError(f"GGUF: extra_kv {key!r}: empty arrays cannot be written")
        w.add_array(key, list(val))
    else:
        raise EdgeqError(f"GGUF: extra_kv {key!r}: expected bool/int/float/str/list, got {type(val).__name__}")


def _model_name(ir: ModelIR) -> str:
    src = ir.source or {}
    name = src.get("name") or (Path(str(src["path"])).name if src.get("path") else None)
    return str(name or "edgeq-model")


def base_type_of_plan(ir: ModelIR, types: Mapping[str, QType]) -> QType:
    counts = Counter(as_qtype(types.get(name, QType.F32)) for name in ir.linears)
    if not counts:
        return QType.F32
    order = list(QType)
    return max(counts, key=lambda q: (counts[q], -order.index(q)))


def _padded_vocab(tok: TokenizerSpec, n_vocab: int) -> tuple[list[str], list[int]]:
    tokens = list(tok.tokens)
    types = [int(t) for t in tok.token_types]
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(_TOKEN_UNUSED)
    return tokens, types


def _write_tokenizer(w, tok: TokenizerSpec, n_vocab: int) -> None:
    tokens, types = _padded_vocab(tok, n_vocab)
    w.add_tokenizer_model(tok.model)
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tokens)
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
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def write_model_header(w, ir: ModelIR, base: QType, extra_kv: Mapping[str, Any] | None,
                       ffn: int | list[int] | None = None) -> None:
    """Model metadata: hparams, file type, tokenizer, then ``extra_kv`` (sorted; may not shadow
    ours). ``ffn``: a per-layer list for ``deci``; default the IR's intermediate size."""
    gguf = _gguf()
    hp = ir.hparams
    w.add_type("model")
    w.add_name(_model_name(ir))
    w.add_context_length(int(hp.max_position_embeddings))
    w.add_embedding_length(int(hp.hidden_size))
    w.add_block_count(int(hp.num_layers))
    w.add_feed_forward_length(int(hp.intermediate_size) if ffn is None else ffn)
    w.add_head_count(int(hp.num_heads))
    w.add_head_count_kv(int(hp.num_kv_heads))
    w.add_rope_freq_base(float(hp.rope_theta))
    w.add_layer_norm_rms_eps(float(hp.rms_norm_eps))
    w.add_vocab_size(int(hp.vocab_size))
    w.add_rope_dimension_count(int(hp.head_dim))
    if hp.head_dim != hp.hidden_size // hp.num_heads:
        w.add_key_length(int(hp.head_dim))
        w.add_value_length(int(hp.head_dim))
    w.add_file_type(LLAMA_FTYPE[base])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(w, ir.tokenizer, hp.vocab_size)
    ours = set(w.kv_data[0])
    for key in sorted(extra_kv or {}):
        if key in ours:
            raise EdgeqError(f"GGUF: extra_kv may not override {key!r}")
        _add_kv(w, key, extra_kv[key])


def fixed_overhead_bytes(ir: ModelIR) -> int:
    """Bytes of a model GGUF that do not depend on the 2-D weights' types: header, metadata,
    tokenizer, the F32 1-D tensors, and per-tensor index entries + alignment (estimated at
    96 bytes per 2-D tensor). Used to turn a total-size budget into a weight budget."""
    gguf = _gguf()
    shapes = _tensor_plan_names(ir)
    one_d = [n for n, s in shapes.items() if len(s) == 1]
    n_2d = len(shapes) - len(one_d)
    fd, tmp = tempfile.mkstemp(prefix=".edgeq-overhead.", suffix=".gguf")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, GGUF_ARCH.get(ir.arch, "llama"))
        try:
            write_model_header(w, ir, QType.F32, None)
            for n in one_d:
                arr = ir.linears[n[:-len(".bias")]].bias if n.endswith(".bias") else ir.tensors[n]
                w.add_tensor(gguf_tensor_name(n), np.ascontiguousarray(arr, dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
        return os.path.getsize(tmp) + 96 * n_2d
    finally:
        os.unlink(tmp)


# Rows encoded per chunk when a 2-D tensor is streamed (~16M values: 64 MB of float32 + the
# quantizer's temporaries), so a vocabulary-sized matrix never sits in memory in float32.
STREAM_CHUNK_VALUES = 1 << 24


def _encoded_nbytes(shape: tuple[int, ...], qt: QType) -> int:
    info = FORMATS[qt]
    n = int(np.prod(shape, dtype=np.int64))
    return n // info.block_size * info.type_size


def _tensor_info_args(shape: tuple[int, ...], qt: QType):
    """(shape, dtype, raw_dtype) as ``GGUFWriter.add_tensor`` would record them for the encoded tensor."""
    gguf = _gguf()
    if qt == QType.F32:
        return shape, np.dtype(np.float32), None
    if qt == QType.F16:
        return shape, np.dtype(np.float16), None
    info = FORMATS[qt]
    return (*shape[:-1], shape[-1] // info.block_size * info.type_size), np.dtype(np.uint8), \
        gguf.GGMLQuantizationType[qt.value]


def _encoded_chunks(arr, qt: QType):
    """Yield the encoded bytes of ``arr`` (an array, a lazy tensor or ``_Raw``) in row chunks.

    GGML formats encode each row on its own, so chunked encoding gives exactly the bytes of a
    whole-tensor encode (tested); a lazy tensor is read chunk by chunk from its file."""
    if isinstance(arr, _Raw) or getattr(arr, "ndim", 1) < 2:
        yield _encode(arr, qt)[0]
        return
    rows = arr.shape[0]
    step = max(1, STREAM_CHUNK_VALUES // max(1, int(np.prod(arr.shape[1:], dtype=np.int64))))
    if step >= rows:
        yield _encode(arr, qt)[0]
        return
    for r0 in range(0, rows, step):
        yield _encode(np.asarray(arr[r0:r0 + step], dtype=np.float32), qt)[0]


def write_tensors(w, shapes: Mapping[str, tuple[int, ...]], types: Mapping[str, QType], array_of, label: str,
                  progress: bool) -> None:
    """Write header, metadata, tensor index, then each IR-named tensor (``array_of(name)`` gives
    its float32 data, lazily or as ``_Raw`` bytes) streamed: encoded and written one tensor (one
    row chunk of a large tensor) at a time, so memory is bounded by a chunk, not by the model.

    ``shapes``: IR name -> numpy shape, in file order. The bytes are those of gguf-py's in-memory
    ``add_tensor`` + ``write_tensors_to_file`` (same index, alignment and padding)."""
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        qt = types.get(name, QType.F32)
        tshape, dtype, raw = _tensor_info_args(shape, qt)
        w.add_tensor_info(gguf_tensor_name(name), tshape, dtype, _encoded_nbytes(shape, qt), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0] if isinstance(w.fout, list) else w.fout
    w.write_padding(fout, fout.tell())
    names = list(shapes)
    if progress:
        names = tqdm(names, desc=f"quantizing {label}", unit="tensor", leave=False)
    for name in names:
        qt = types.get(name, QType.F32)
        expected = _encoded_nbytes(tuple(shapes[name]), qt)
        written = 0
        for chunk in _encoded_chunks(array_of(name), qt):
            chunk.tofile(fout)
            written += chunk.nbytes
        if written != expected:
            raise EdgeqError(f"GGUF: {name}: wrote {written} bytes, expected {expected} for "
                             f"{tuple(shapes[name])} {qt.value}")
        w.write_padding(fout, written)


def write_gguf(ir: ModelIR, path: str | Path, types: Mapping[str, QType | str], *,
               extra_kv: Mapping[str, Any] | None = None, allow_low_rank: bool = False,
               progress: bool = False) -> Path:
    """Write ``ir`` as a GGUF model file stock llama.cpp loads; returns ``path``.

    ``progress``: show a tqdm bar (on stderr) over the tensors being quantized.

    ``types``: a plan from :func:`tensor_types` (IR names; missing names default to F32).
    Quantized data comes from :func:`edgeq.quant.reference.quantize` (bit-exact GGML blocks).
    The output is deterministic (fixed key and tensor order, default 32-byte alignment, no
    timestamps) and written atomically (temp file + ``os.replace``).

    LowRank branches are not part of a model GGUF: with any present this raises unless
    ``allow_low_rank=True`` (then only the base weights are written; ship the branches with
    :func:`write_lora_gguf`). ``extra_kv`` adds metadata keys (sorted; may not shadow ours).
    """
    gguf = _gguf()
    types = {k: as_qtype(v) for k, v in types.items()}
    problems = check(ir, types, allow_low_rank=allow_low_rank)
    if problems:
        raise EdgeqError(f"GGUF: cannot write {Path(path).name}: {problems[0]}"
                         + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    hp = ir.hparams
    arch = GGUF_ARCH[hp.arch]
    base = base_type_of_plan(ir, types)
    shapes = _tensor_plan_names(ir)

    def array_of(name: str) -> np.ndarray:
        if name.endswith(".bias"):
            lin = ir.linears[name[: -len(".bias")]]
            return _out_rows(ir, lin, lin.bias)
        if name in ir.linears:
            lin = ir.linears[name]
            qt = types.get(name, QType.F32)
            raw = packed_rows(ir, lin, qt)
            return _Raw(raw, qt) if raw is not None else _out_rows(ir, lin, lin.weight)
        return ir.tensors[name]

    def fill(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            write_model_header(w, ir, base, extra_kv)
            write_tensors(w, shapes, types, array_of, Path(path).name, progress)
        finally:
            w.close()

    atomic_write_file(Path(path), fill)
    return Path(path)


def write_lora_gguf(ir: ModelIR, adapter_name: str, path: str | Path, *,
                    dtype: QType | str = QType.F32) -> Path:
    """Write the LowRank branches with ``source == f"lora:{adapter_name}"`` as a llama.cpp LoRA
    adapter GGUF (``llama_adapter_lora_init`` / llama-cpp-python ``lora_path``).

    ``adapter_name`` may also be a full source string (``"qerr"``, ``"lora:x"``) to ship other
    branch kinds. Layout: ``blk.N.<role>.weight.lora_a`` numpy ``(rank, in)`` and
    ``.lora_b`` numpy ``(out, rank)`` (Q/K ``lora_b`` rows permuted like the base weights for
    the llama arch). ``adapter.lora.alpha`` is set to ``scale * rank`` of the first branch so
    llama.cpp's ``alpha / rank`` reproduces ``LowRank.scale``; a branch whose scale*rank differs
    gets the ratio folded into its ``lora_b``. ``dtype``: F32 or F16.
    """
    gguf = _gguf()
    qt = as_qtype(dtype)
    if qt not in (QType.F32, QType.F16):
        raise EdgeqError(f"LoRA GGUF: expected dtype F32 or F16, got {qt.value}")
    if ir.arch not in GGUF_ARCH:
        raise EdgeqError(f"LoRA GGUF: architecture {ir.arch.value!r} is not supported")
    source = adapter_name if (":" in adapter_name or adapter_name == "qerr") else f"lora:{adapter_name}"
    branches: list[tuple[Linear, LowRank]] = []
    for i in range(ir.hparams.num_layers):
        for role in ROLE_ORDER:
            lin = ir.linears.get(linear_name(i, role))
            if lin is None:
                continue
            mine = [lr for lr in lin.low_rank if lr.source == source]
            if len(mine) > 1:
                raise EdgeqError(f"LoRA GGUF: {lin.name} has {len(mine)} branches from {source!r}; expected at most 1")
            if mine:
                branches.append((lin, mine[0]))
    if not branches:
        have = sorted({lr.source for l in ir.linears.values() for lr in l.low_rank})
        raise EdgeqError(f"LoRA GGUF: no low-rank branches with source {source!r} (found: {have})")
    first = branches[0][1]
    alpha = float(np.float32(first.scale * first.rank))

    def fill(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), GGUF_ARCH[ir.arch])
        try:
            w.add_type("adapter")
            w.add_name(f"{_model_name(ir)}-{source.replace(':', '-')}")
            w.add_string("adapter.type", "lora")
            w.add_float32("adapter.lora.alpha", alpha)
            for lin, lr in branches:
                if lr.a.shape != (lr.rank, lin.in_features) or lr.b.shape != (lin.out_features, lr.rank):
                    raise EdgeqError(f"LoRA GGUF: {lin.name}: expected A {(lr.rank, lin.in_features)} and "
                                     f"B {(lin.out_features, lr.rank)}, got {lr.a.shape} and {lr.b.shape}")
                llama_scale = alpha / lr.rank if alpha else 1.0
                b = np.asarray(lr.b, dtype=np.float32)
                if not math.isclose(float(lr.scale), llama_scale, rel_tol=1e-6, abs_tol=0.0):
                    b = (b.astype(np.float64) * (float(lr.scale) / llama_scale)).astype(np.float32)
                b = _out_rows(ir, lin, b)
                a = np.ascontiguousarray(lr.a, dtype=np.float32)
                if qt == QType.F16:
                    a, b = a.astype(np.float16), b.astype(np.float16)
                base = gguf_tensor_name(lin.name)
                w.add_tensor(f"{base}.lora_a", np.ascontiguousarray(a))
                w.add_tensor(f"{base}.lora_b", np.ascontiguousarray(b))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()

    atomic_write_file(Path(path), fill)
    return Path(path)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

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


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _read_tokenizer(reader) -> TokenizerSpec | None:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        return None
    model = str(_field(reader, "tokenizer.ggml.model", "gpt2"))
    pre = str(_field(reader, "tokenizer.ggml.pre", "default"))
    types = [int(t) for t in (_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))]
    merges = list(_field(reader, "tokenizer.ggml.merges") or [])

    def opt_id(key: str) -> int | None:
        v = _field(reader, key)
        return None if v is None else int(v)

    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    # drop the [PADi]/unused tail that write_gguf (and convert_hf_to_gguf) append
    n = len(tokens)
    while n > 0 and types[n - 1] == _TOKEN_UNUSED and tokens[n - 1] == f"[PAD{n - 1}]":
        n -= 1
    tokens, types = list(tokens[:n]), types[:n]
    return TokenizerSpec(
        tokenizer_json=_tokenizer_json(model, pre, tokens, types, merges),
        model=model, pre=pre, tokens=tuple(tokens), token_types=tuple(types), merges=tuple(merges),
        bos_id=opt_id("tokenizer.ggml.bos_token_id"), eos_id=opt_id("tokenizer.ggml.eos_token_id"),
        pad_id=opt_id("tokenizer.ggml.padding_token_id"), unk_id=opt_id("tokenizer.ggml.unknown_token_id"),
        add_bos=bool(add_bos) if add_bos is not None else False,
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


def _dequant(t) -> np.ndarray:
    gguf = _gguf()
    shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
    tt = t.tensor_type
    name = tt.name
    if name == "F32":
        return np.array(t.data, dtype=np.float32).reshape(shape)
    if name in QType.__members__:
        return np.asarray(dequantize(np.asarray(t.data), QType(name), shape), dtype=np.float32)
    try:
        out = gguf.quants.dequantize(np.asarray(t.data), tt)
    except NotImplementedError:
        raise EdgeqError(f"GGUF: tensor {t.name}: type {name} cannot be dequantized") from None
    return np.asarray(out, dtype=np.float32).reshape(shape)


def read_gguf(path: str | Path) -> ModelIR:
    """GGUF model file -> ModelIR (float32 weights, HF rotate-half Q/K order restored).

    Supports general.architecture ``llama`` and ``qwen2``; F32/F16/Q8_0/Q4_0/Q4_1 tensors are
    decoded with edgeq's reference dequantizer, other ggml types through
    ``gguf.quants.dequantize``. The TokenizerSpec is rebuilt from ``tokenizer.ggml.*``; its
    ``tokenizer_json`` is a reconstructed HF tokenizer.json for byte-level BPE vocabularies
    with pre-tokenizer ``gpt-2``/``default``/``smollm``/``qwen2``, and the empty string ``""``
    for anything else (text tokenization then needs the llama.cpp runtime). Unknown
    architectures and truncated/corrupt files raise a one-line :class:`EdgeqError`.
    """
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - gguf-py raises ValueError/IndexError/... on bad input
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgeqError(f"{path}: not a readable GGUF file (truncated or corrupt?): {msg}") from None
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise EdgeqError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte "
                             f"{int(t.data_offset) + int(t.n_bytes)}, file has {size}")
    try:
        arch_s = _field(reader, "general.architecture")
        gtype = _field(reader, "general.type")
    except Exception as exc:  # noqa: BLE001
        raise EdgeqError(f"{path}: corrupt GGUF metadata: {exc}") from None
    if gtype == "adapter":
        raise EdgeqError(f"{path}: is a LoRA adapter GGUF, not a model")
    if arch_s not in _ARCH_FROM_GGUF:
        raise EdgeqError(f"{path}: unsupported GGUF architecture {arch_s!r} "
                         f"(supported: {sorted(_ARCH_FROM_GGUF)})")
    arch = _ARCH_FROM_GGUF[arch_s]
    try:
        return _read_model(reader, path, arch, arch_s)
    except EdgeqError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise EdgeqError(f"{path}: corrupt GGUF file: {type(exc).__name__}: {exc}") from None


def _f32(v: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def _read_model(reader, path: Path, arch: Arch, a: str) -> ModelIR:
    raw: dict[str, Any] = {t.name: t for t in reader.tensors}

    def req(key: str):
        v = _field(reader, f"{a}.{key}")
        if v is None:
            raise EdgeqError(f"{path}: missing metadata {a}.{key}")
        return v

    if "token_embd.weight" not in raw:
        raise EdgeqError(f"{path}: missing tensor token_embd.weight")
    te = raw["token_embd.weight"]
    hidden = int(req("embedding_length"))
    n_head = int(req("attention.head_count"))
    n_kv = int(_field(reader, f"{a}.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, f"{a}.attention.key_length", hidden // n_head))
    n_layers = int(req("block_count"))
    hp = HParams(
        arch=arch,
        vocab_size=int(te.shape[1]),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_layers=n_layers,
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rope_theta=_f32(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(req("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_field(reader, f"{a}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in raw,
        attention_bias="blk.0.attn_q.bias" in raw,
    )

    def get(name: str) -> np.ndarray:
        if name not in raw:
            raise EdgeqError(f"{path}: missing tensor {name}")
        return _dequant(raw[name])

    tensors: dict[str, np.ndarray] = {"token_embd": get("token_embd.weight"), "output_norm": get("output_norm.weight")}
    if not hp.tie_word_embeddings:
        tensors["output"] = get("output.weight")
    linears: dict[str, Linear] = {}
    for i in range(n_layers):
        tensors[f"blk.{i}.attn_norm"] = get(f"blk.{i}.attn_norm.weight")
        tensors[f"blk.{i}.ffn_norm"] = get(f"blk.{i}.ffn_norm.weight")
        for role in ROLE_ORDER:
            name = linear_name(i, role)
            w = get(f"{name}.weight")
            b = get(f"{name}.bias") if f"{name}.bias" in raw else None
            if _needs_permute(arch, role):
                nh = _heads_for(hp, role)
                w = _interleaved_to_rotate_half(w, nh)
                if b is not None:
                    b = _interleaved_to_rotate_half(b, nh)
            linears[name] = Linear(name=name, role=role, layer=i, weight=np.ascontiguousarray(w, dtype=np.float32),
                                   bias=None if b is None else np.ascontiguousarray(b, dtype=np.float32))
    known = {gguf_tensor_name(n) for n in tensors} | {f"{n}.weight" for n in linears} | \
        {f"{n}.bias" for n, l in linears.items() if l.bias is not None}
    extra = sorted(set(raw) - known)
    if extra:
        raise EdgeqError(f"{path}: unexpected tensors for a {a} model: {extra[:3]}")
    tok = _read_tokenizer(reader)
    name = _field(reader, "general.name")
    source = {"kind": "gguf", "path": str(path), "name": name or path.stem,
              "files": {path.name: sha256_file(path)},
              "file_type": _field(reader, "general.file_type")}
    ir = ModelIR(hparams=hp, linears=linears, tensors=tensors, tokenizer=tok, source=source)
    ir.validate()
    return ir

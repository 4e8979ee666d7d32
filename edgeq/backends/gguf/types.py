"""The per-tensor type plan of a model GGUF: the base type of a bit width, and the types
``llama_model_quantize`` would give each tensor (output head, embeddings, norms)."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Mapping

import numpy as np

from edgeq.backends.gguf.layout import tensor_shapes
from edgeq.errors import EdgeqError
from edgeq.ir import ModelIR
from edgeq.quant import storage
from edgeq.quant.formats import FORMATS, QType, as_qtype

# enum llama_ftype (general.file_type) for the base types we write
LLAMA_FTYPE: dict[QType, int] = {QType.F32: 0, QType.F16: 1, QType.Q4_0: 2, QType.Q4_1: 3, QType.Q8_0: 7,
                                 QType.Q5_0: 8, QType.Q5_1: 9, QType.Q4_K: 15, QType.Q6_K: 18}
# (general.file_type is informational for llama.cpp; Q4_K/Q6_K map to MOSTLY_Q4_K_M / MOSTLY_Q6_K)

# bits -> base type of the block linears
# bits -> base type of the block linears: what --bits means for gguf in the storage-type registry
_BITS: dict[int, QType] = {b: QType(storage.for_bits("gguf", b).name) for b in storage.bits_choices("gguf")}

_GGML_Q6_K_BLOCK = 256


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
    for name, shape in tensor_shapes(ir).items():
        if len(shape) == 1:
            plan[name] = QType.F32  # norms, biases
        elif name in ir.linears:
            plan[name] = pick(name, base, shape[-1])
        elif name == "token_embd":
            plan[name] = pick(name, out_q if hp.tie_word_embeddings else base, shape[-1])
        else:  # the output head
            plan[name] = pick(name, out_q, shape[-1])
    unknown = [k for k in overrides if not k.startswith("re:") and k not in plan]
    if unknown:
        raise EdgeqError(f"GGUF: override for unknown tensor(s) {unknown[:3]}")
    return plan




def base_type_of_plan(ir: ModelIR, types: Mapping[str, QType]) -> QType:
    counts = Counter(as_qtype(types.get(name, QType.F32)) for name in ir.linears)
    if not counts:
        return QType.F32
    order = list(QType)
    return max(counts, key=lambda q: (counts[q], -order.index(q)))


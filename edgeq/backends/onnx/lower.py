"""ModelIR -> ONNX decoder graph (opset 23) + one external weight file, run by onnxruntime.

The graph (built with ``onnx.helper``, ``onnx.checker`` clean) takes the new tokens and the KV
cache and returns logits and the grown cache, so prefill and decode go through the same graph:

* inputs: ``input_ids`` int64 (1, S); ``logits_from`` int64 scalar (first position whose logits
  are computed: 0 for every position, S-1 for generation); ``past.{i}.key`` / ``past.{i}.value``
  float32 (1, KV, P, head_dim) per layer (P = 0 on a fresh context).
* outputs: ``logits`` (1, S - logits_from, vocab); ``present.{i}.key`` / ``.value`` (1, KV, P+S, head_dim).

Activations are 2-D (tokens, features) inside (batch 1). Blocks: embedding Gather, RMSNorm
(``RMSNormalization``), Q/K/V with optional biases (Qwen2), RoPE in the rotate-half form with
per-KV-group gathered frequencies (a UniQL-sorted model keeps its pair order), grouped-query
attention with a causal mask over past + new positions, SwiGLU MLP, tied or untied head; the
family blocks beyond the Llama forward (Gemma 3: GeGLU, QK-norm, sandwich norms, scaled
embedding, query scale, sliding-window layers with their RoPE base) from blocks.py.

Weights: linears as ``com.microsoft.MatMulNBits`` (int4 / int8 group codes from
:mod:`edgeq.quant.intgroup`, block = group) or float32 ``Gemm``; a quantized tied embedding is
*one* initializer used twice, by the head's MatMulNBits and by the embedding lookup (a Gather of
its 8-bit codes, dequantized in the graph). Low-rank branches (LoRA kept separate, error
compensation) are ``x -> MatMul(A^T) -> MatMul(s * B^T)`` added to the base output; a LoRA
branch kept separate has its two matrices as graph inputs whose defaults are a zero rank-1
branch (overridable initializers): the graph alone is the base model, and an onnxruntime adapter
file (``onnxruntime.LoraAdapter``, see :func:`write_adapter`) activated per run supplies the
adapter, so it is switched or disabled without touching the base (the ORT-GenAI scheme). All
initializers but tiny constants live in ``model.onnx.data``, at offsets aligned for mmap.

Pruning rates (a model carrying several): one graph for all of them, with an int64 scalar input
``rate_index`` (index into the rates). The MLP channels a rate prunes are expressed one of two ways
(``OnnxOptions.ffn_rates``): ``"mask"`` (default) keeps the 1-rate graph's two MatMulNBits calls
per MLP (gate|up, down) at full width and zeroes the pruned channels of the SwiGLU output with a
per-rate mask, so rate 0 runs at the speed of a 1-rate graph and every rate reads every MLP weight;
``"segments"`` splits the channels into segments at the kept widths, every segment but the first
an ``If`` on the rate whose branch reads its weights from the outer scope, so a rate reads only its
channels' weights but rate 0 makes four times the MatMulNBits calls (docs/benchmarks.md). Either
way each weight is stored and prepacked once. Q/K pairs and V/O components are pruned with per-rate
masks on the Q/K/V outputs and on the attention output (exact; the KV cache keeps zeros in the dims
a rate drops, as the reference runtime's ``kv="keep"``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgeq.artifact import write_tokenizer_spec
from edgeq.tokenizer_pack import VOCAB_FILE, write_packed
from edgeq.backends.onnx.decoder import DecoderGraph, Lowered
from edgeq.backends.onnx.graph import Deferred
from edgeq.backends.onnx.options import ATTENTION, FFN_RATES, RATE_INPUT, OnnxOptions, ffn_segments, graph_rates
from edgeq.errors import EdgeqError
from edgeq.families import LINEAR_ROLES
from edgeq.ir import ModelIR, Role, linear_name
from edgeq.passes.prune_bias import rate_bias_tables
from edgeq.passes.sort_qk import restore_rope_order
from edgeq.quant.intgroup import dequantized
from edgeq.streaming import RegionFile

OPSET = 23
IR_VERSION = 10
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.spec.json"
INLINE_BYTES = 256  # smaller initializers stay inside model.onnx
ALIGN_LARGE = 4096  # offsets of tensors >= 64 KiB are page aligned (mmap-friendly)
ROLES = LINEAR_ROLES
__all__ = ["ATTENTION", "FFN_RATES", "RATE_INPUT", "OnnxOptions", "ffn_segments", "graph_rates"]  # re-exported


def _need_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise EdgeqError("the onnx format needs the 'onnx' package: pip install 'edgeq[onnx]'") from None



def check(ir: ModelIR) -> list[str]:
    """Problems that keep ``ir`` from lowering to ONNX."""
    problems = []
    if ir.hparams.head_dim % 2:
        problems.append(f"head_dim {ir.hparams.head_dim} is odd")
    return problems


def graph_ir(ir: ModelIR, weights: OnnxOptions) -> ModelIR:
    """The IR the graph is built from: for GQA attention, the Q/K pair sort undone (exactly)."""
    problems = check(ir)
    if problems:
        raise EdgeqError(f"cannot lower to onnx: {problems[0]}")
    if weights.attention == "gqa" and ir.rope_index:
        ir = restore_rope_order(ir)  # GQA's rotary uses the sequential frequencies (a row permutation)
    return ir


def build_model(ir: ModelIR, weights: OnnxOptions, switchable=()) -> tuple[object, Lowered, dict[str, np.ndarray]]:
    """(graph builder, bookkeeping, initializers) for ``graph_ir(ir)``."""
    _need_onnx()
    gir = graph_ir(ir, weights)
    # bias compensation through the weights the graph stores (dequantized), as lowered_ir computes it
    bias = rate_bias_tables(gir, graph_rates(gir), linear=lambda i, r: lowered_linear(gir, i, r, weights)) \
        if graph_rates(gir) is not None else None
    # pruning widths count Q/K pairs in the sorted order; tell the graph when it was undone
    d = DecoderGraph(gir, weights, frozenset(switchable), sorted_rope=None if gir.rope_index else ir.rope_index,
                     rate_bias=bias)
    g = d.build()
    return g, d.low, g.inits


def write_onnx(ir: ModelIR, out_dir: Path, weights: OnnxOptions, switchable=(), progress: bool = False) -> dict:
    """Write ``model.onnx`` + ``model.onnx.data`` + ``tokenizer.spec.json`` (+ ``tokenizer.vocab.safetensors``
    for a SentencePiece-style vocabulary: ``edgeq.tokenizer_pack``) into ``out_dir``.

    Returns the manifest's ``onnx`` section. ``switchable``: names of LoRA adapters kept separate
    whose branches become overridable inputs (see :func:`write_adapter`).
    """
    import onnx

    g, low, inits = build_model(ir, weights, switchable)
    out_dir = Path(out_dir)
    data_path = out_dir / DATA_FILE
    # streamed: the data file is laid out from the initializers' sizes first, then each weight is
    # computed (quantized, transposed...) one tensor / one row chunk at a time and written at its
    # offset; only tiny initializers (inline in model.onnx) are kept
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for n, a in inits.items():
        if a.nbytes > INLINE_BYTES:
            align = ALIGN_LARGE if a.nbytes >= 65536 else 64
            pos += (-pos) % align
            offsets[n] = (pos, a.nbytes)
            pos += a.nbytes
    inline = {n: np.zeros(a.shape, a.dtype) for n, a in inits.items() if isinstance(a, Deferred) and n not in offsets}
    sources = list(dict.fromkeys(a.source for a in inits.values() if isinstance(a, Deferred)))
    if progress:
        sources = tqdm(sources, desc="onnx weights", unit="tensor", leave=False)
    with RegionFile(data_path, pos, offsets) as f:
        for n in offsets:
            if not isinstance(inits[n], Deferred):
                f.write(n, inits[n])
        for source in sources:
            for n, at, arr in source():
                if arr.dtype != inits[n].dtype:
                    raise EdgeqError(f"onnx: {n}: computed {arr.dtype}, declared {inits[n].dtype}")
                if n in offsets:
                    f.write(n, arr, at=at)
                else:
                    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
                    inline[n].reshape(-1).view(np.uint8)[at:at + raw.nbytes] = raw

    def tensor_proto(name: str, arr):
        if name not in offsets:
            return onnx.numpy_helper.from_array(inline[name] if isinstance(arr, Deferred) else arr, name)
        t = onnx.TensorProto(name=name, dims=list(arr.shape),
                             data_type=onnx.helper.np_dtype_to_tensor_dtype(arr.dtype))
        t.data_location = onnx.TensorProto.EXTERNAL
        off, length = offsets[name]
        for k, v in (("location", DATA_FILE), ("offset", str(off)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    model = g.model("edgeq_decoder", OPSET, IR_VERSION, tensor_proto)
    model_path = out_dir / MODEL_FILE
    model_path.write_bytes(model.SerializeToString(deterministic=True))
    onnx.checker.check_model(str(model_path))
    if ir.tokenizer is not None:
        write_tokenizer_spec(ir.tokenizer, out_dir / TOKENIZER_FILE)
    # SentencePiece-style vocabularies also as arrays a session memory-maps (runtimes.spm_bpe)
    vocab_file = VOCAB_FILE if ir.tokenizer is not None and write_packed(ir.tokenizer, out_dir / VOCAB_FILE) else None
    info = {"model_file": MODEL_FILE, "data_file": DATA_FILE, "opset": OPSET, "ir_version": IR_VERSION,
            "weights": weights.to_json(), "tensor_formats": dict(sorted(low.formats.items())),
            "tokenizer_file": TOKENIZER_FILE if ir.tokenizer is not None else None,
            **({"tokenizer_vocab_file": vocab_file} if vocab_file else {}),
            "adapter_inputs": {a: sorted(v) for a, v in sorted(low.adapter_inputs.items())}}
    rates = graph_rates(ir)
    if rates is not None:
        total = sum(a.nbytes for a in inits.values())
        per_rate = {}
        for r in rates:
            skipped = sum(inits[n].nbytes for (layer, hi), names in low.segment_inits.items()
                          if ir.prune.widths[r][layer].ffn < hi for n in names)
            per_rate[f"{r:g}"] = total - skipped
        info.update(rate_input=RATE_INPUT, rates=list(rates), weight_bytes_per_rate=per_rate)
    return info


def lowered_linear(ir: ModelIR, i: int, role: Role, weights: OnnxOptions):
    """One linear of :func:`lowered_ir`: its weight as the graph stores it, dequantized."""
    lin = ir.linear(i, role)
    if role == Role.DOWN and weights.linear is not None:
        w = np.concatenate([dequantized(np.ascontiguousarray(lin.weight[:, lo:hi]), weights.linear)
                            for lo, hi in ffn_segments(ir, i, weights.ffn_rates)], axis=1)
    else:
        w = dequantized(lin.weight, weights.linear)
    return dataclasses.replace(lin, weight=w, packed=None)


def lowered_ir(ir: ModelIR, weights: OnnxOptions) -> ModelIR:
    """The float model the ONNX graph computes: ``ir`` with every weight replaced by the
    dequantized int-group values the graph stores (MLP down projections of a multi-rate graph
    quantized per channel segment, as the graph holds them). Q/K stay in ``ir``'s pair order
    (the GQA graph's exact row permutation of them is the same model)."""
    problems = check(ir)
    if problems:
        raise EdgeqError(f"cannot lower to onnx: {problems[0]}")
    linears = dict(ir.linears)
    for i in range(ir.hparams.num_layers):
        for role in ROLES:
            lin = lowered_linear(ir, i, role, weights)
            linears[lin.name] = lin
    tensors = dict(ir.tensors)
    tensors["token_embd"] = dequantized(ir.tensors["token_embd"], weights.head)
    if not ir.hparams.tie_word_embeddings:
        tensors["output"] = dequantized(ir.tensors["output"], weights.head)
    return ir.replace(linears=linears, tensors=tensors)


def write_adapter(ir: ModelIR, adapter: str, path: Path, weights: OnnxOptions) -> list[str]:
    """One LoRA adapter as an onnxruntime adapter file (``.onnx_adapter``): the overridable
    ``lora.<adapter>.<linear>.a/.b`` inputs of the graph written with ``weights`` (Q/K rows in the
    graph's pair order). Needs onnxruntime at build time."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise EdgeqError("writing onnx adapters needs onnxruntime: pip install 'edgeq[onnx]'") from None
    ir = graph_ir(ir, weights)
    params = {}
    for name in sorted(ir.linears):
        lin = ir.linears[name]
        for lr in lin.low_rank:
            if lr.source == f"lora:{adapter}":
                params[f"lora.{adapter}.{name}.a"] = np.ascontiguousarray(lr.a.T, dtype=np.float32)
                params[f"lora.{adapter}.{name}.b"] = np.ascontiguousarray((lr.b * np.float32(lr.scale)).T,
                                                                          dtype=np.float32)
    if not params:
        raise EdgeqError(f"no LoRA branches named {adapter!r} in the model")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(path))
    return sorted(params)




def linear_names(ir: ModelIR) -> list[str]:
    return [linear_name(i, r) for i in range(ir.hparams.num_layers) for r in ROLES]

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
attention with a causal mask over past + new positions, SwiGLU MLP, tied or untied head.

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
channels' weights but rate 0 makes four times the MatMulNBits calls (each call has a fixed cost:
0.73x the 1-rate graph's decode speed on SmolLM2, docs/benchmarks.md). Either way each weight is
stored and prepacked once. Q/K pairs and V/O components are pruned with per-rate masks on the
Q/K/V outputs and on the attention output (exact; the KV cache keeps zeros in the dims a rate
drops, as the reference runtime's ``kv="keep"``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgeq.artifact import write_tokenizer_spec
from edgeq.errors import EdgeqError
from edgeq.ir import Linear, ModelIR, Role, linear_name
from edgeq.backends.onnx.graph import MS_DOMAIN, Deferred, GraphBuilder
from edgeq.passes.sort_qk import qk_restore_rows, restore_rope_order
from edgeq.quant.intgroup import dequantized, fit_format, rtn_int
from edgeq.streaming import RegionFile, row_ranges

OPSET = 23
IR_VERSION = 10
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.spec.json"
INLINE_BYTES = 256  # smaller initializers stay inside model.onnx
ALIGN_LARGE = 4096  # offsets of tensors >= 64 KiB are page aligned (mmap-friendly)
ROLES = (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)


def _need_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise EdgeqError("the onnx format needs the 'onnx' package: pip install 'edgeq[onnx]'") from None


ATTENTION = ("gqa", "standard")
FFN_RATES = ("mask", "segments")


@dataclass(frozen=True)
class OnnxOptions:
    """How weights are stored (int-group format names from edgeq.quant.intgroup, or None for
    float32) and how attention is expressed."""

    linear: str | None = "int4_g32_sym"
    head: str | None = "int8_g32_sym"  # the output head and the (tied or not) embedding table
    accuracy_level: int = 4  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
    # "gqa": com.microsoft.GroupQueryAttention (RoPE, KV-cache append, grouped heads in one node;
    # the Q/K pair sort is undone first, exactly); "standard": plain opset-23 ops with per-KV-group
    # gathered RoPE frequencies (the form pruned Q/K pairs need).
    attention: str = "gqa"
    max_positions: int = 32768  # GQA cos/sin cache rows (capped by the model's max positions)
    # multi-rate graphs: "mask": full-width MLP matmuls, the pruned channels zeroed (rate 0 as fast
    # as a 1-rate graph); "segments": MLP split at the kept widths behind If nodes (a rate reads
    # only its weights, at the cost of more, smaller MatMulNBits calls)
    ffn_rates: str = "mask"

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise EdgeqError(f"unknown onnx attention {self.attention!r} (available: {', '.join(ATTENTION)})")
        if self.ffn_rates not in FFN_RATES:
            raise EdgeqError(f"unknown onnx ffn_rates {self.ffn_rates!r} (available: {', '.join(FFN_RATES)})")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)



RATE_INPUT = "rate_index"  # int64 scalar: index into the artifact's pruning rates (multi-rate graphs only)


def graph_rates(ir: ModelIR) -> tuple[float, ...] | None:
    """The pruning rates a graph of ``ir`` switches between (None: one rate, no rate input)."""
    return tuple(ir.prune.rates) if ir.prune is not None and len(ir.prune.rates) > 1 else None


def ffn_segments(ir: ModelIR, layer: int, ffn_rates: str = "segments") -> list[tuple[int, int]]:
    """MLP channel segments ``[lo, hi)`` of one layer, each one MatMulNBits call per matmul. With
    ``ffn_rates="segments"``, split at every kept width a rate uses: the first is always computed,
    segment ``[lo, hi)`` only at rates keeping ``hi`` channels or more; with ``"mask"``, one."""
    F = ir.hparams.intermediate_size
    rates = graph_rates(ir)
    if rates is None or ffn_rates == "mask":
        return [(0, F)]
    ends = sorted({ir.prune.widths[r][layer].ffn for r in rates} | {F})
    return list(zip([0] + ends[:-1], ends))



class _Rows:
    """A float32 (N, K) weight read on demand: row ranges of IR tensors (lazy or in memory)
    stacked, optionally restricted to input columns ``[lo, hi)``. Nothing is read until
    :meth:`read`, which reads only the rows asked for."""

    def __init__(self, parts, cols: tuple[int, int] | None = None):
        self.parts = [(t, int(lo), int(hi)) for t, lo, hi in parts]  # (tensor, first row, end row)
        self.cols = cols
        k = self.parts[0][0].shape[1]
        self.shape = (sum(hi - lo for _, lo, hi in self.parts), k if cols is None else cols[1] - cols[0])

    @classmethod
    def of(cls, t, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> "_Rows":
        lo, hi = rows or (0, t.shape[0])
        return cls([(t, lo, hi)], cols)

    def read(self, r0: int = 0, r1: int | None = None) -> np.ndarray:
        r1 = self.shape[0] if r1 is None else r1
        out, at = [], 0
        for t, lo, hi in self.parts:
            a, b = max(r0, at), min(r1, at + hi - lo)
            if a < b:
                part = t[lo + a - at:lo + b - at]
                out.append(part if self.cols is None else part[:, self.cols[0]:self.cols[1]])
            at += hi - lo
        return np.ascontiguousarray(out[0] if len(out) == 1 else np.concatenate(out), dtype=np.float32)


def _quantized_pieces(rows: _Rows, fmt, names: dict[str, str]):
    """``(name, byte offset, array)`` pieces of a weight's MatMulNBits initializers (``names``:
    B / scales / zero_points -> initializer), quantized one row chunk at a time (group-wise
    quantization is per row, so the pieces are exactly those of the whole weight)."""
    n, k = rows.shape
    for r0, r1 in row_ranges(n, k):
        t = rtn_int(rows.read(r0, r1), fmt)
        mnb = t.to_matmulnbits()
        mnb["scales"] = mnb["scales"].reshape(r1 - r0, t.n_blocks)
        for key, name in names.items():
            a = mnb[key]
            yield name, r0 * (a.nbytes // (r1 - r0)), a


def _transposed_pieces(rows: _Rows, name: str):
    """The float32 weight transposed to (in, out), in row chunks of the transpose (the weight
    itself is read whole: one tensor)."""
    w = rows.read()
    n, k = w.shape
    for c0, c1 in row_ranges(k, n):
        yield name, c0 * n * 4, np.ascontiguousarray(w[:, c0:c1].T)


def _row_pieces(rows: _Rows, name: str):
    n, k = rows.shape
    for r0, r1 in row_ranges(n, k):
        yield name, r0 * k * 4, rows.read(r0, r1)


@dataclass
class _Lowered:
    """Bookkeeping of one lowering: which format each tensor got, adapter inputs, and which
    initializers only a pruning-rate segment reads."""

    formats: dict[str, str] = dataclasses.field(default_factory=dict)
    adapter_inputs: dict[str, dict[str, tuple[str, str]]] = dataclasses.field(default_factory=dict)
    segment_inits: dict[tuple[int, int], list[str]] = dataclasses.field(default_factory=dict)  # (layer, hi)


class _DecoderGraph:
    def __init__(self, ir: ModelIR, w: OnnxOptions, switchable: frozenset[str], sorted_rope=None):
        import onnx

        self.TP = onnx.TensorProto
        self.ir, self.w, self.switchable = ir, w, switchable
        self.g = GraphBuilder()
        self.low = _Lowered()
        self._rope_cache: dict[bytes, tuple[str, str]] = {}
        self.rates = graph_rates(ir)
        # the Q/K pair order pruning widths refer to, when the graph IR had it undone (GQA)
        self.sorted_rope = {int(k): np.asarray(v) for k, v in (sorted_rope or {}).items()}
        self._gathered: dict[bytes, str] = {}
        self.rate_index: str | None = None

    # ---- weights -----------------------------------------------------------------------------
    def _quantized(self, name: str, weight: _Rows, fmt_name: str):
        """(B, scales, attrs) initializers of a MatMulNBits weight, quantized when written."""
        fmt = fit_format(fmt_name, weight.shape[1])
        n, k = weight.shape
        nb = k // fmt.group
        names = {"B": f"{name}.qweight", "scales": f"{name}.scales"}
        if not fmt.symmetric:
            names["zero_points"] = f"{name}.zero_points"

        def source():
            return _quantized_pieces(weight, fmt, names)

        b = self.g.init(names["B"], Deferred(np.uint8, (n, nb, fmt.group * fmt.bits // 8), source))
        s = self.g.init(names["scales"], Deferred(np.float32, (n, nb), source))
        zp = (self.g.init(names["zero_points"], Deferred(np.uint8, (n * (-(-nb * fmt.bits // 8)),), source))
              if not fmt.symmetric else None)
        self.low.formats[name] = fmt.name
        attrs = {"K": k, "N": n, "bits": fmt.bits, "block_size": fmt.group, "accuracy_level": self.w.accuracy_level}
        return b, s, zp, attrs, fmt

    def _matmul(self, x: str, name: str, weight: _Rows, fmt_name: str | None, bias: str | None = None) -> str:
        if fmt_name is None:
            n, k = weight.shape
            wt = self.g.init(f"{name}.weight_t", Deferred(np.float32, (k, n), lambda: _transposed_pieces(
                weight, f"{name}.weight_t")))  # (in, out)
            self.low.formats[name] = "F32"
            y = self.g.op("MatMul", [x, wt], name=f"{name}.matmul")
            return self.g.op("Add", [y, bias], name=f"{name}.add_bias") if bias else y
        b, s, zp, attrs, _ = self._quantized(name, weight, fmt_name)
        ins = [x, b, s] + ([zp] if zp else ([""] if bias else [])) + (["", bias] if bias else [])
        return self.g.op("MatMulNBits", ins, name=f"{name}.matmul", domain=MS_DOMAIN, **attrs)

    def linear(self, x: str, lin: Linear) -> str:
        bias = self.g.init(f"{lin.name}.bias", lin.bias.astype(np.float32)) if lin.bias is not None else None
        y = self._matmul(x, lin.name, _Rows.of(lin.weight), self.w.linear, bias)
        for lr in lin.low_rank:
            y = self.g.op("Add", [y, self._branch(x, lin, lr)], name=f"{lin.name}.add_branch")
        return y

    def stacked(self, x: str, lins: list[Linear], name: str, rows: tuple[int, int] | None = None) -> str:
        """One matmul over the row-stacked weights (and biases) of ``lins`` — each restricted to
        output ``rows`` when given — so one MatMulNBits replaces several (Q/K/V, gate/up). Only
        for linears without low-rank branches; group-wise quantization is per row, so the stored
        values are those of the separate weights."""
        lo, hi = rows or (0, None)
        w = _Rows([(lin.weight, lo, lin.out_features if hi is None else hi) for lin in lins])
        b = None
        if any(lin.bias is not None for lin in lins):
            b = self.g.init(f"{name}.bias", np.concatenate([
                (lin.bias if lin.bias is not None else np.zeros(lin.out_features, np.float32))[lo:hi]
                for lin in lins]).astype(np.float32))
        y = self._matmul(x, name, w, self.w.linear, b)
        fmt = self.low.formats.pop(name)
        for lin in lins:
            self.low.formats[lin.name if rows is None else f"{lin.name}.ch{lo}_{hi}"] = fmt
        return y

    def _branch(self, x: str, lin: Linear, lr, rows: tuple[int, int] | None = None,
                cols: tuple[int, int] | None = None) -> str:
        """``x -> (x A^T) (s B^T)``; ``rows`` / ``cols``: only that output / input channel range
        (an MLP segment of a multi-rate graph)."""
        tag = lr.source.split(":", 1)[1] if lr.source.startswith("lora:") else lr.source
        base = f"lora.{tag}.{lin.name}" if lr.source.startswith("lora:") else f"{lin.name}.{tag}"
        sl = f".ch{rows[0]}_{rows[1]}" if rows else (f".ch{cols[0]}_{cols[1]}" if cols else "")
        if lr.source.startswith("lora:") and tag in self.switchable:
            if lin.name in self.low.adapter_inputs.get(tag, {}):
                a, b = self.low.adapter_inputs[tag][lin.name]
            else:  # defaults: a zero rank-1 branch (the base model); the adapter file overrides them
                dim = f"rank_{tag}"
                a = self.g.overridable_init(f"{base}.a", np.zeros((lin.in_features, 1), np.float32),
                                            [lin.in_features, dim])
                b = self.g.overridable_init(f"{base}.b", np.zeros((1, lin.out_features), np.float32),
                                            [dim, lin.out_features])
                self.low.adapter_inputs.setdefault(tag, {})[lin.name] = (a, b)
            if rows:
                b = self.g.op("Slice", [b, self.g.const([rows[0]]), self.g.const([rows[1]]), self.g.const([1])],
                              name=f"{base}.b{sl}")
            if cols:
                a = self.g.op("Slice", [a, self.g.const([cols[0]]), self.g.const([cols[1]]), self.g.const([0])],
                              name=f"{base}.a{sl}")
        else:
            na, nb_ = f"{base}.a{sl}", f"{base}.b{sl}"

            def source():  # computed when written
                at = np.ascontiguousarray(lr.a.T, dtype=np.float32)  # (in, rank)
                bt = np.ascontiguousarray((lr.b * np.float32(lr.scale)).T, dtype=np.float32)  # (rank, out)
                if rows:
                    bt = np.ascontiguousarray(bt[:, rows[0]:rows[1]])
                if cols:
                    at = np.ascontiguousarray(at[cols[0]:cols[1]])
                return iter([(na, 0, at), (nb_, 0, bt)])

            n_in = cols[1] - cols[0] if cols else lin.in_features
            n_out = rows[1] - rows[0] if rows else lin.out_features
            a = self.g.init(na, Deferred(np.float32, (n_in, lr.rank), source))
            b = self.g.init(nb_, Deferred(np.float32, (lr.rank, n_out), source))
        return self.g.op("MatMul", [self.g.op("MatMul", [x, a], name=f"{base}{sl}.xa"), b], name=f"{base}{sl}.xab")

    # ---- pruning rates -------------------------------------------------------------------------
    def _gather_by_rate(self, table: np.ndarray, tag: str) -> str:
        """``table[rate_index]`` (one row per carried rate), shared by content."""
        key = table.dtype.str.encode() + bytes(str(table.shape), "ascii") + table.tobytes()
        if key not in self._gathered:
            t = self.g.init(self.g.name(f"rate.{tag}_table"), table)
            self._gathered[key] = self.g.op("Gather", [t, self.rate_index], name=f"rate.{tag}", axis=0)
        return self._gathered[key]

    def masked(self, y: str, layer: int, kinds: str) -> str:
        """``y`` with the channels the current rate prunes zeroed. ``kinds``: the parts of ``y``
        (concatenated), each "q"/"k" (RoPE pairs beyond the kept slots of every head), "v" (V
        components per KV group) or "o" (the attention output's components per head, the O
        projection's pruned inputs); e.g. "qkv" for a packed Q/K/V output. Identity in
        single-rate graphs and where no rate prunes."""
        if self.rates is None:
            return y
        table = np.concatenate([self._mask_table(layer, k) for k in kinds], axis=1)
        if table.all():
            return y
        return self.g.op("Mul", [y, self._gather_by_rate(table, f"mask_{kinds}")], name=f"blk.{layer}.{kinds}_rate_mask")

    def _mask_table(self, layer: int, kind: str) -> np.ndarray:
        """(rates, channels) float 0/1: which output channels of ``kind`` each rate keeps."""
        hp = self.ir.hparams
        H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
        half = D // 2
        rows = []
        for r in self.rates:
            w = self.ir.prune.widths[r][layer]
            if kind in ("q", "k"):
                m = np.tile(np.tile(np.arange(half) < w.qk_pairs, 2), H if kind == "q" else KV)
                idx = self.sorted_rope.get(layer)
                if idx is not None:  # the graph's Q/K rows are in the original pair order
                    m = m[qk_restore_rows(hp, idx, Role.Q if kind == "q" else Role.K)]
            else:
                m = np.tile(np.arange(D) < w.v_dims, KV if kind == "v" else H)
            rows.append(m)
        return np.stack(rows).astype(np.float32)

    def _seg_linear(self, x: str, lin: Linear, rows=None, cols=None, bias: bool = True) -> str:
        lo, hi = rows or cols
        name = f"{lin.name}.ch{lo}_{hi}"
        w = _Rows.of(lin.weight, rows=rows) if rows else _Rows.of(lin.weight, cols=cols)
        b = None
        if bias and lin.bias is not None:
            b = self.g.init(f"{name}.bias", (lin.bias[lo:hi] if rows else lin.bias).astype(np.float32))
        y = self._matmul(x, name, w, self.w.linear, b)
        for lr in lin.low_rank:
            y = self.g.op("Add", [y, self._branch(x, lin, lr, rows=rows, cols=cols)], name=f"{name}.add_branch")
        return y

    def _gate_up(self, i: int, h: str, rows: tuple[int, int] | None = None) -> str:
        """silu(gate h) * (up h), over channel ``rows`` (default all); gate and up share one
        matmul when neither carries a low-rank branch."""
        ir, g = self.ir, self.g
        gate, up = ir.linear(i, Role.GATE), ir.linear(i, Role.UP)
        if not gate.low_rank and not up.low_rank:
            lo, hi = rows or (0, gate.out_features)
            name = f"blk.{i}.ffn_gate_up" + (f".ch{lo}_{hi}" if rows else "")
            gt, u = g.op("Split", [self.stacked(h, [gate, up], name, rows), g.const([hi - lo, hi - lo])],
                         name=f"{name}.split", n_out=2, axis=-1)
        elif rows:
            gt, u = self._seg_linear(h, gate, rows=rows), self._seg_linear(h, up, rows=rows)
        else:
            gt, u = self.linear(h, gate), self.linear(h, up)
        return g.op("Mul", [g.op("Mul", [gt, g.op("Sigmoid", [gt])], name=f"blk.{i}.silu"), u], name=f"blk.{i}.swiglu")

    def _ffn_part(self, i: int, h: str, lo: int, hi: int) -> str:
        act = self._gate_up(i, h, rows=(lo, hi))
        return self._seg_linear(act, self.ir.linear(i, Role.DOWN), cols=(lo, hi), bias=False)

    def ffn(self, i: int, h: str) -> str:
        """SwiGLU MLP. In a multi-rate graph, ``ffn_rates="mask"``: the full-width matmuls with the
        SwiGLU output masked by the rate; ``"segments"``: the channels split into segments at the
        kept widths, every segment but the first an ``If`` on the rate (its weights read from the
        outer scope, so each is stored, and prepacked, once), skipped when the rate prunes it."""
        ir, g = self.ir, self.g
        segs = ffn_segments(ir, i, self.w.ffn_rates)
        if len(segs) == 1:
            act = self._gate_up(i, h)
            if self.rates is not None:  # "mask": the channels beyond the rate's kept width zeroed
                F = ir.hparams.intermediate_size
                table = np.stack([np.arange(F) < ir.prune.widths[r][i].ffn for r in self.rates]).astype(np.float32)
                if not table.all():
                    act = g.op("Mul", [act, self._gather_by_rate(table, "mask_ffn")], name=f"blk.{i}.ffn_rate_mask")
            return self.linear(act, ir.linear(i, Role.DOWN))
        import onnx

        y = self._ffn_part(i, h, *segs[0])
        for lo, hi in segs[1:]:
            cond = self._gather_by_rate(np.array([ir.prune.widths[r][i].ffn >= hi for r in self.rates]), f"ffn{hi}")
            before = set(g.inits)
            sub = g.subgraph()
            self.g = sub
            try:
                part = self._ffn_part(i, h, lo, hi)
            finally:
                self.g = g
            self.low.segment_inits[(i, hi)] = [n for n in g.inits if n not in before]
            zero = g.subgraph()
            z = zero.op("Constant", [], name=f"blk.{i}.ffn.skip{lo}_{hi}",
                        value=onnx.numpy_helper.from_array(np.zeros((), np.float32)))
            seg = g.op("If", [cond], name=f"blk.{i}.ffn.ch{lo}_{hi}",
                       then_branch=sub.branch_graph(f"blk{i}_ffn_ch{lo}_{hi}", [(part, self.TP.FLOAT)]),
                       else_branch=zero.branch_graph(f"blk{i}_ffn_skip{lo}_{hi}", [(z, self.TP.FLOAT)]))
            y = g.op("Add", [y, seg], name=f"blk.{i}.ffn.sum")
        down = ir.linear(i, Role.DOWN)
        if down.bias is not None:
            y = g.op("Add", [y, g.init(f"{down.name}.bias", down.bias.astype(np.float32))], name=f"blk.{i}.ffn.bias")
        return y

    def rms_norm(self, x: str, name: str) -> str:
        w = self.g.init(f"{name}.weight", self.ir.tensors[name].astype(np.float32))
        return self.g.op("RMSNormalization", [x, w], name=name, axis=-1, epsilon=float(self.ir.hparams.rms_norm_eps))

    # ---- embedding / head ------------------------------------------------------------------------
    def embedding_and_head(self, ids: str):
        """(hidden states of the ids, a function hidden -> logits)."""
        hp, g = self.ir.hparams, self.g
        emb = _Rows.of(self.ir.tensors["token_embd"])
        fmt = self.w.head
        if fmt is not None and fit_format(fmt, hp.hidden_size).bits != 8:
            raise EdgeqError(f"the embedding/head format must be 8-bit or float32, got {fmt}")
        if fmt is None:
            table = g.init("token_embd.weight", Deferred(np.float32, emb.shape, lambda: _row_pieces(
                emb, "token_embd.weight")))
            self.low.formats["token_embd"] = "F32"
            x = g.op("Gather", [table, ids], name="token_embd.gather", axis=0)  # (1, S, hidden)
        else:
            b, s, _, attrs, f = self._quantized("token_embd", emb, fmt)
            codes = g.op("Gather", [b, ids], name="token_embd.gather_codes", axis=0)  # (1, S, nb, group)
            sc = g.op("Unsqueeze", [g.op("Gather", [s, ids], name="token_embd.gather_scales", axis=0),
                                    g.const([-1])], name="token_embd.scales3")
            val = g.op("Sub", [g.op("Cast", [codes], name="token_embd.cast", to=self.TP.FLOAT),
                               g.const(np.float32(f.default_zero_point), np.float32)], name="token_embd.center")
            x = g.op("Reshape", [g.op("Mul", [val, sc], name="token_embd.dequant"), g.const([1, -1, hp.hidden_size])],
                     name="token_embd.rows")
            tied_b, tied_s, tied_attrs = b, s, attrs
        if hp.tie_word_embeddings:
            if fmt is None:  # one float table: Gemm reads it transposed (2-D activations)
                return x, lambda h: g.op("Unsqueeze", [g.op("Gemm", [g.op("Reshape", [h, g.const([-1, hp.hidden_size])]),
                                                                     table], name="output.gemm", transB=1),
                                                       g.const([0])], name="output.logits3")
            return x, lambda h: g.op("MatMulNBits", [h, tied_b, tied_s], name="output.matmul", domain=MS_DOMAIN,
                                     **dict(tied_attrs, accuracy_level=self.w.accuracy_level))
        out_w = _Rows.of(self.ir.tensors["output"])
        return x, lambda h: self._matmul(h, "output", out_w, fmt)

    # ---- RoPE ------------------------------------------------------------------------------------
    def _cos_sin(self, pos_f: str, freqs: np.ndarray, tag: str) -> tuple[str, str]:
        """cos/sin (S, n, 1, half) for per-head frequencies ``freqs`` (n, half); shared by content."""
        key = freqs.astype(np.float32).tobytes() + bytes(str(freqs.shape), "ascii")
        if key not in self._rope_cache:
            g = self.g
            f = g.init(g.name(f"rope.freqs.{tag}"), freqs.astype(np.float32)[:, None, :])  # (n, 1, half)
            ang = g.op("Mul", [pos_f, f], name="rope.angles")  # (S,1,1,1) * (n,1,half)
            self._rope_cache[key] = (g.op("Cos", [ang], name="rope.cos"), g.op("Sin", [ang], name="rope.sin"))
        return self._rope_cache[key]

    def rope(self, x: str, n: int, cos: str, sin: str, name: str) -> str:
        g, D = self.g, self.ir.hparams.head_dim
        x5 = g.op("Reshape", [x, g.const([-1, n, 2, D // 2])], name=f"{name}.heads")
        x0, x1 = g.op("Split", [x5, g.const([1, 1])], name=f"{name}.halves", n_out=2, axis=2)
        r0 = g.op("Sub", [g.op("Mul", [x0, cos]), g.op("Mul", [x1, sin])], name=f"{name}.rot0")
        r1 = g.op("Add", [g.op("Mul", [x1, cos]), g.op("Mul", [x0, sin])], name=f"{name}.rot1")
        return g.op("Concat", [r0, r1], name=f"{name}.rotated", axis=2)  # (S, n, 2, half)

    # ---- the decoder -----------------------------------------------------------------------------
    def build(self):
        ir, g, TP = self.ir, self.g, self.TP
        hp = ir.hparams
        KV, D, L = hp.num_kv_heads, hp.head_dim, hp.num_layers
        ids2 = g.input("input_ids", TP.INT64, [1, "seq"])
        logits_from = g.input("logits_from", TP.INT64, [])
        if self.rates is not None:
            self.rate_index = g.input(RATE_INPUT, TP.INT64, [])
        pasts = []
        for i in range(L):
            pasts.append((g.input(f"past.{i}.key", TP.FLOAT, [1, KV, "past", D]),
                          g.input(f"past.{i}.value", TP.FLOAT, [1, KV, "past", D])))
        ids = ids2  # activations are (1, S, features)
        n_new = g.op("Shape", [ids], name="n_new", start=1, end=2)  # (1,)
        n_past = g.op("Shape", [pasts[0][0]], name="n_past", start=2, end=3)
        total = g.op("Add", [n_past, n_new], name="n_total")
        rope = {"inv_freq": _inv_freq(D, hp.rope_theta), "total": total}
        if self.w.attention == "standard":
            sq = lambda t: g.op("Squeeze", [t, g.const([0])])  # noqa: E731
            q_pos = g.op("Range", [sq(n_past), sq(total), g.const(1)], name="q_pos")  # (S,)
            k_pos = g.op("Range", [g.const(0), sq(total), g.const(1)], name="k_pos")  # (T,)
            future = g.op("Greater", [g.op("Unsqueeze", [k_pos, g.const([0])]),
                                      g.op("Unsqueeze", [q_pos, g.const([1])])], name="future")  # (S, T)
            rope["mask"] = g.op("Where", [future, g.const(np.float32(-np.inf), np.float32),
                                          g.const(np.float32(0), np.float32)], name="causal_mask")
            rope["pos_f"] = g.op("Reshape", [g.op("Cast", [q_pos], name="pos_f32", to=TP.FLOAT),
                                             g.const([-1, 1, 1, 1])], name="pos_f")
            rope["scale"] = g.const(np.float32(1.0 / np.sqrt(D)), np.float32)
        x, head = self.embedding_and_head(ids)
        for i in range(L):
            h = self.rms_norm(x, f"blk.{i}.attn_norm")
            qkv = [ir.linear(i, r) for r in (Role.Q, Role.K, Role.V)]
            present = [g.output(f"present.{i}.key", TP.FLOAT, [1, KV, "total", D]),
                       g.output(f"present.{i}.value", TP.FLOAT, [1, KV, "total", D])]
            if not any(lin.low_rank for lin in qkv):  # one matmul (and one rate mask) for Q, K and V
                packed = self.masked(self.stacked(h, qkv, f"blk.{i}.attn_qkv"), i, "qkv")
                if self.w.attention == "gqa":
                    q, k, v = packed, "", ""  # GroupQueryAttention takes packed QKV
                else:
                    q, k, v = g.op("Split", [packed, g.const([hp.num_heads * D, KV * D, KV * D])],
                                   name=f"blk.{i}.qkv_split", n_out=3, axis=-1)
            else:
                q, k, v = (self.masked(self.linear(h, lin), i, kind) for lin, kind in zip(qkv, "qkv"))
            if self.w.attention == "gqa":
                o = self.gqa(i, q, k, v, pasts[i], present, rope)
            else:
                o = self.standard_attention(i, q, k, v, pasts[i], present, rope)
            o = self.masked(o, i, "o")
            x = g.op("Add", [x, self.linear(o, ir.linear(i, Role.O))], name=f"blk.{i}.attn_residual")
            h = self.rms_norm(x, f"blk.{i}.ffn_norm")
            x = g.op("Add", [x, self.ffn(i, h)], name=f"blk.{i}.ffn_residual")
        x = g.op("Slice", [x, g.op("Unsqueeze", [logits_from, g.const([0])]), g.const([np.iinfo(np.int64).max]),
                           g.const([1])], name="last_positions")
        x = self.rms_norm(x, "output_norm")
        g.op("Identity", [head(x)], name="logits", outputs=[g.output("logits", TP.FLOAT, [1, "out_seq", hp.vocab_size])])
        return g

    def standard_attention(self, i, q, k, v, past, present, ctx) -> str:
        """Plain ops: RoPE with this layer's gathered frequencies, KV concat, GQA, softmax."""
        ir, g = self.ir, self.g
        hp = ir.hparams
        H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
        grp, half = H // KV, D // 2
        idx = ir.rope_index.get(i)
        idx = np.tile(np.arange(half), (KV, 1)) if idx is None else np.asarray(idx)
        fk = ctx["inv_freq"][idx]  # (KV, half)
        cos_k, sin_k = self._cos_sin(ctx["pos_f"], fk, "k")
        cos_q, sin_q = self._cos_sin(ctx["pos_f"], np.repeat(fk, grp, axis=0), "q")
        q = self.rope(q, H, cos_q, sin_q, f"blk.{i}.q_rope")
        k = self.rope(k, KV, cos_k, sin_k, f"blk.{i}.k_rope")
        k4 = g.op("Transpose", [g.op("Reshape", [k, g.const([1, -1, KV, D])])], name=f"blk.{i}.k_new", perm=[0, 2, 1, 3])
        v4 = g.op("Transpose", [g.op("Reshape", [v, g.const([1, -1, KV, D])])], name=f"blk.{i}.v_new", perm=[0, 2, 1, 3])
        k_all = g.op("Concat", [past[0], k4], name=f"blk.{i}.k_all", axis=2, outputs=[present[0]])  # (1, KV, T, D)
        v_all = g.op("Concat", [past[1], v4], name=f"blk.{i}.v_all", axis=2, outputs=[present[1]])
        # q: (1, S, H*D) -> (1, KV, grp*S, D), rows (head-in-group, position)
        q5 = g.op("Transpose", [g.op("Reshape", [q, g.const([-1, KV, grp, D])])], perm=[1, 2, 0, 3])
        q4 = g.op("Mul", [g.op("Reshape", [q5, g.const([1, KV, -1, D])]), ctx["scale"]], name=f"blk.{i}.q_scaled")
        kt = g.op("Transpose", [k_all], name=f"blk.{i}.k_t", perm=[0, 1, 3, 2])
        sc = g.op("Reshape", [g.op("MatMul", [q4, kt], name=f"blk.{i}.scores"), g.const([KV, grp, -1, 0])])
        p = g.op("Softmax", [g.op("Add", [sc, ctx["mask"]], name=f"blk.{i}.masked")], name=f"blk.{i}.softmax", axis=-1)
        p4 = g.op("Reshape", [p, g.const([1, KV, -1, 0])])
        o = g.op("MatMul", [p4, v_all], name=f"blk.{i}.attn")  # (1, KV, grp*S, D)
        return g.op("Reshape", [g.op("Transpose", [g.op("Reshape", [o, g.const([KV, grp, -1, D])])], perm=[2, 0, 1, 3]),
                                g.const([1, -1, H * D])], name=f"blk.{i}.attn_heads")

    def gqa(self, i, q, k, v, past, present, ctx) -> str:
        """One com.microsoft.GroupQueryAttention node (rotary in rotate-half form, KV append)."""
        ir, g, TP = self.ir, self.g, self.TP
        hp = ir.hparams
        if "gqa" not in ctx:
            n = min(self.w.max_positions, int(hp.max_position_embeddings))
            ang = np.arange(n, dtype=np.float32)[:, None] * ctx["inv_freq"][None, :]
            total32 = g.op("Cast", [ctx["total"]], name="total_i32", to=TP.INT32)  # (1,)
            ctx["gqa"] = {
                "cos": g.init("rope.cos_cache", np.cos(ang).astype(np.float32)),
                "sin": g.init("rope.sin_cache", np.sin(ang).astype(np.float32)),
                "seqlens_k": g.op("Sub", [total32, g.const([1], np.int32)], name="seqlens_k"),
                "total": g.op("Squeeze", [total32, g.const([0])], name="total_seq_len"),
            }
        c = ctx["gqa"]
        o = g.op("GroupQueryAttention", [q, k, v, past[0], past[1], c["seqlens_k"], c["total"], c["cos"], c["sin"]],
                 name=f"blk.{i}.gqa", domain=MS_DOMAIN, outputs=[f"blk.{i}.attn_out", present[0], present[1]],
                 num_heads=hp.num_heads, kv_num_heads=hp.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                 scale=float(1.0 / np.sqrt(hp.head_dim)))
        return o[0]  # (1, S, H*D)


def _inv_freq(head_dim: int, theta: float) -> np.ndarray:
    return (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                         / np.float32(head_dim)))).astype(np.float32)


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


def build_model(ir: ModelIR, weights: OnnxOptions, switchable=()) -> tuple[object, _Lowered, dict[str, np.ndarray]]:
    """(graph builder, bookkeeping, initializers) for ``graph_ir(ir)``."""
    _need_onnx()
    gir = graph_ir(ir, weights)
    # pruning widths count Q/K pairs in the sorted order; tell the graph when it was undone
    d = _DecoderGraph(gir, weights, frozenset(switchable), sorted_rope=None if gir.rope_index else ir.rope_index)
    g = d.build()
    return g, d.low, g.inits


def write_onnx(ir: ModelIR, out_dir: Path, weights: OnnxOptions, switchable=(), progress: bool = False) -> dict:
    """Write ``model.onnx`` + ``model.onnx.data`` + ``tokenizer.spec.json`` into ``out_dir``.

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
    info = {"model_file": MODEL_FILE, "data_file": DATA_FILE, "opset": OPSET, "ir_version": IR_VERSION,
            "weights": weights.to_json(), "tensor_formats": dict(sorted(low.formats.items())),
            "tokenizer_file": TOKENIZER_FILE if ir.tokenizer is not None else None,
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


def lowered_ir(ir: ModelIR, weights: OnnxOptions) -> ModelIR:
    """The float model the ONNX graph computes: ``ir`` with every weight replaced by the
    dequantized int-group values the graph stores (MLP down projections of a multi-rate graph
    with ``ffn_rates="segments"`` quantized per channel segment, as the graph holds them). Q/K stay in ``ir``'s pair order
    (the GQA graph's exact row permutation of them is the same model)."""
    problems = check(ir)
    if problems:
        raise EdgeqError(f"cannot lower to onnx: {problems[0]}")
    linears = dict(ir.linears)
    for i in range(ir.hparams.num_layers):
        for role in ROLES:
            lin = ir.linear(i, role)
            if role == Role.DOWN and weights.linear is not None:
                w = np.concatenate([dequantized(np.ascontiguousarray(lin.weight[:, lo:hi]), weights.linear)
                                    for lo, hi in ffn_segments(ir, i, weights.ffn_rates)], axis=1)
            else:
                w = dequantized(lin.weight, weights.linear)
            linears[lin.name] = dataclasses.replace(lin, weight=w, packed=None)
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

"""The ONNX decoder graph of a ModelIR: embedding, RMSNorm, attention (GQA contrib op or plain
opset-23 with per-KV-group RoPE), SwiGLU / GeGLU MLP (rate-switched segments), head; the family
blocks beyond the Llama forward (Gemma 3's) in blocks.py; see lower.py for the graph's inputs and
outputs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgeq.backends.onnx import blocks
from edgeq.backends.onnx.graph import MS_DOMAIN, Deferred, GraphBuilder
from edgeq.backends.onnx.options import RATE_INPUT, OnnxOptions, ffn_segments, graph_rates
from edgeq.backends.onnx.weights import Rows, quantized_pieces, row_pieces, transposed_pieces
from edgeq.errors import EdgeqError
from edgeq.ir import Linear, ModelIR, Role
from edgeq.passes.sort_qk import qk_restore_rows
from edgeq.quant.intgroup import fit_format
from runtimes.reference import rope_inv_freq

# Largest untied head (float32 bytes of its weight) one MatMulNBits call computes (Decoder.head).
HEAD_CALL_MAX_BYTES = 256 * 1024 ** 2


@dataclass
class Lowered:
    """Bookkeeping of one lowering: which format each tensor got, adapter inputs, and which
    initializers only a pruning-rate segment reads."""

    formats: dict[str, str] = dataclasses.field(default_factory=dict)
    adapter_inputs: dict[str, dict[str, tuple[str, str]]] = dataclasses.field(default_factory=dict)
    segment_inits: dict[tuple[int, int], list[str]] = dataclasses.field(default_factory=dict)  # (layer, hi)


class DecoderGraph:
    def __init__(self, ir: ModelIR, w: OnnxOptions, switchable: frozenset[str], sorted_rope=None, rate_bias=None):
        import onnx

        self.TP = onnx.TensorProto
        self.ir, self.w, self.switchable = ir, w, switchable
        self.g = GraphBuilder()
        self.low = Lowered()
        self._rope_cache: dict[bytes, tuple[str, str]] = {}
        self.rates = graph_rates(ir)
        # the Q/K pair order pruning widths refer to, when the graph IR had it undone (GQA)
        self.sorted_rope = {int(k): np.asarray(v) for k, v in (sorted_rope or {}).items()}
        self._gathered: dict[bytes, str] = {}
        self.rate_index: str | None = None
        # bias compensation (--prune-bias): rate -> (layers, 2, hidden), [:, 0] o_proj, [:, 1] ffn_down
        # (edgeq.passes.prune_bias.rate_bias_tables); None: none
        self.rate_bias = rate_bias if self.rates is not None else None

    # ---- weights -----------------------------------------------------------------------------
    def _quantized(self, name: str, weight: Rows, fmt_name: str):
        """(B, scales, attrs) initializers of a MatMulNBits weight, quantized when written."""
        fmt = fit_format(fmt_name, weight.shape[1])
        n, k = weight.shape
        nb = k // fmt.group
        names = {"B": f"{name}.qweight", "scales": f"{name}.scales"}
        if not fmt.symmetric:
            names["zero_points"] = f"{name}.zero_points"

        def source():
            return quantized_pieces(weight, fmt, names)

        b = self.g.init(names["B"], Deferred(np.uint8, (n, nb, fmt.group * fmt.bits // 8), source))
        s = self.g.init(names["scales"], Deferred(np.float32, (n, nb), source))
        zp = (self.g.init(names["zero_points"], Deferred(np.uint8, (n * (-(-nb * fmt.bits // 8)),), source))
              if not fmt.symmetric else None)
        self.low.formats[name] = fmt.name
        attrs = {"K": k, "N": n, "bits": fmt.bits, "block_size": fmt.group, "accuracy_level": self.w.accuracy_level}
        return b, s, zp, attrs, fmt

    def _matmul(self, x: str, name: str, weight: Rows, fmt_name: str | None, bias: str | None = None) -> str:
        if fmt_name is None:
            n, k = weight.shape
            wt = self.g.init(f"{name}.weight_t", Deferred(np.float32, (k, n), lambda: transposed_pieces(
                weight, f"{name}.weight_t")))  # (in, out)
            self.low.formats[name] = "F32"
            y = self.g.op("MatMul", [x, wt], name=f"{name}.matmul")
            return self.g.op("Add", [y, bias], name=f"{name}.add_bias") if bias else y
        b, s, zp, attrs, _ = self._quantized(name, weight, fmt_name)
        ins = [x, b, s] + ([zp] if zp else ([""] if bias else [])) + (["", bias] if bias else [])
        return self.g.op("MatMulNBits", ins, name=f"{name}.matmul", domain=MS_DOMAIN, **attrs)

    def linear(self, x: str, lin: Linear) -> str:
        bias = self.g.init(f"{lin.name}.bias", lin.bias.astype(np.float32)) if lin.bias is not None else None
        y = self._matmul(x, lin.name, Rows.of(lin.weight), self.w.linear, bias)
        for lr in lin.low_rank:
            y = self.g.op("Add", [y, self._branch(x, lin, lr)], name=f"{lin.name}.add_branch")
        return y

    def stacked(self, x: str, lins: list[Linear], name: str, rows: tuple[int, int] | None = None) -> str:
        """One matmul over the row-stacked weights (and biases) of ``lins`` — each restricted to
        output ``rows`` when given — so one MatMulNBits replaces several (Q/K/V, gate/up). Only
        for linears without low-rank branches; group-wise quantization is per row, so the stored
        values are those of the separate weights."""
        lo, hi = rows or (0, None)
        w = Rows([(lin.weight, lo, lin.out_features if hi is None else hi) for lin in lins])
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

    def biased(self, y: str, layer: int, which: int) -> str:
        """``y`` (the output of o_proj, ``which`` 0, or of ffn_down, 1) plus the current rate's bias
        compensation: ``table[rate_index]``, one row per carried rate (zeros at rates that prune
        nothing there). Identity without compensation or where no rate prunes."""
        if self.rate_bias is None:
            return y
        table = np.stack([self.rate_bias[r][layer, which] for r in self.rates]).astype(np.float32)
        if not table.any():
            return y
        name = ("o", "down")[which]
        return self.g.op("Add", [y, self._gather_by_rate(table, f"bias_{name}{layer}")], name=f"blk.{layer}.{name}_rate_bias")

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
        w = Rows.of(lin.weight, rows=rows) if rows else Rows.of(lin.weight, cols=cols)
        b = None
        if bias and lin.bias is not None:
            b = self.g.init(f"{name}.bias", (lin.bias[lo:hi] if rows else lin.bias).astype(np.float32))
        y = self._matmul(x, name, w, self.w.linear, b)
        for lr in lin.low_rank:
            y = self.g.op("Add", [y, self._branch(x, lin, lr, rows=rows, cols=cols)], name=f"{name}.add_branch")
        return y

    def _gate_up(self, i: int, h: str, rows: tuple[int, int] | None = None) -> str:
        """act(gate h) * (up h), over channel ``rows`` (default all); gate and up share one
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
        return blocks.gated(g, gt, u, ir.hparams.hidden_act, i)

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
        emb = Rows.of(self.ir.tensors["token_embd"])
        fmt = self.w.head
        if fmt is not None and fit_format(fmt, hp.hidden_size).bits != 8:
            raise EdgeqError(f"the embedding/head format must be 8-bit or float32, got {fmt}")
        if fmt is None:
            table = g.init("token_embd.weight", Deferred(np.float32, emb.shape, lambda: row_pieces(
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
        return x, lambda h: self.head(h, fmt)

    def head(self, h: str, fmt: str | None) -> str:
        """The untied output head: one MatMulNBits, or — when its weight in float32 exceeds
        HEAD_CALL_MAX_BYTES (vocabularies of 128k at hidden 4096) — one per block of vocabulary rows,
        concatenated: onnxruntime without prepacking dequantizes a call's whole weight to float32
        (2.1 GB for the 8B shape's head in one call), and the rows' logits are the same either way."""
        out = self.ir.tensors["output"]
        n, k = out.shape
        if fmt is None or 4 * n * k <= HEAD_CALL_MAX_BYTES:
            return self._matmul(h, "output", Rows.of(out), fmt)
        step = max(1, HEAD_CALL_MAX_BYTES // (4 * k))
        parts = []
        for lo in range(0, n, step):
            name = f"output.r{lo}_{min(n, lo + step)}"
            parts.append(self._matmul(h, name, Rows.of(out, (lo, min(n, lo + step))), fmt))
            self.low.formats["output"] = self.low.formats.pop(name)
        return self.g.op("Concat", parts, name="output.concat", axis=-1)

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
        rope = {"total": total}
        if self.w.attention == "standard":
            sq = lambda t: g.op("Squeeze", [t, g.const([0])])  # noqa: E731
            q_pos = g.op("Range", [sq(n_past), sq(total), g.const(1)], name="q_pos")  # (S,)
            k_pos = g.op("Range", [g.const(0), sq(total), g.const(1)], name="k_pos")  # (T,)
            future = g.op("Greater", [g.op("Unsqueeze", [k_pos, g.const([0])]),
                                      g.op("Unsqueeze", [q_pos, g.const([1])])], name="future")  # (S, T)
            rope["mask"] = g.op("Where", [future, g.const(np.float32(-np.inf), np.float32),
                                          g.const(np.float32(0), np.float32)], name="causal_mask")
            if hp.layer_types is not None and hp.sliding_window:
                rope["window_mask"] = blocks.window_mask(g, q_pos, k_pos, rope["mask"], hp.sliding_window)
            rope["pos_f"] = g.op("Reshape", [g.op("Cast", [q_pos], name="pos_f32", to=TP.FLOAT),
                                             g.const([-1, 1, 1, 1])], name="pos_f")
            rope["scale"] = g.const(np.float32(hp.attention_scale), np.float32)
        x, head = self.embedding_and_head(ids)
        x = blocks.scaled_embedding(g, x, hp)
        for i in range(L):
            h = self.rms_norm(x, f"blk.{i}.attn_norm")
            qkv = [ir.linear(i, r) for r in (Role.Q, Role.K, Role.V)]
            present = [g.output(f"present.{i}.key", TP.FLOAT, [1, KV, "total", D]),
                       g.output(f"present.{i}.value", TP.FLOAT, [1, KV, "total", D])]
            if not any(lin.low_rank for lin in qkv):  # one matmul (and one rate mask) for Q, K and V
                packed = self.masked(self.stacked(h, qkv, f"blk.{i}.attn_qkv"), i, "qkv")
                if self.w.attention == "gqa" and not hp.qk_norm:
                    q, k, v = packed, "", ""  # GroupQueryAttention takes packed QKV
                else:
                    q, k, v = g.op("Split", [packed, g.const([hp.num_heads * D, KV * D, KV * D])],
                                   name=f"blk.{i}.qkv_split", n_out=3, axis=-1)
            else:
                q, k, v = (self.masked(self.linear(h, lin), i, kind) for lin, kind in zip(qkv, "qkv"))
            q = blocks.head_norm(self, q, hp.num_heads, f"blk.{i}.attn_q_norm")
            k = blocks.head_norm(self, k, KV, f"blk.{i}.attn_k_norm")
            if self.w.attention == "gqa":
                o = self.gqa(i, q, k, v, pasts[i], present, rope)
            else:
                o = self.standard_attention(i, q, k, v, pasts[i], present, rope)
            o = self.masked(o, i, "o")
            y = blocks.post_norm(self, self.biased(self.linear(o, ir.linear(i, Role.O)), i, 0), f"blk.{i}.post_attention_norm")
            x = g.op("Add", [x, y], name=f"blk.{i}.attn_residual")
            h = self.rms_norm(x, f"blk.{i}.ffn_norm")
            y = blocks.post_norm(self, self.biased(self.ffn(i, h), i, 1), f"blk.{i}.post_ffw_norm")
            x = g.op("Add", [x, y], name=f"blk.{i}.ffn_residual")
        x = g.op("Slice", [x, g.op("Unsqueeze", [logits_from, g.const([0])]), g.const([np.iinfo(np.int64).max]),
                           g.const([1])], name="last_positions")
        x = self.rms_norm(x, "output_norm")
        g.op("Identity", [head(x)], name="logits", outputs=[g.output("logits", TP.FLOAT, [1, "out_seq", hp.vocab_size])])
        return g

    def standard_attention(self, i, q, k, v, past, present, ctx) -> str:
        """Plain ops: RoPE with this layer's gathered frequencies (its own base), KV concat, GQA,
        softmax under the causal (or, on a sliding layer, the window) mask."""
        ir, g = self.ir, self.g
        hp = ir.hparams
        H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
        grp, half = H // KV, D // 2
        idx = ir.rope_index.get(i)
        idx = np.tile(np.arange(half), (KV, 1)) if idx is None else np.asarray(idx)
        fk = rope_inv_freq(D, hp.layer_rope_theta(i))[idx]  # (KV, half)
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
        mask = ctx["window_mask"] if hp.is_sliding(i) else ctx["mask"]
        p = g.op("Softmax", [g.op("Add", [sc, mask], name=f"blk.{i}.masked")], name=f"blk.{i}.softmax", axis=-1)
        p4 = g.op("Reshape", [p, g.const([1, KV, -1, 0])])
        o = g.op("MatMul", [p4, v_all], name=f"blk.{i}.attn")  # (1, KV, grp*S, D)
        return g.op("Reshape", [g.op("Transpose", [g.op("Reshape", [o, g.const([KV, grp, -1, D])])], perm=[2, 0, 1, 3]),
                                g.const([1, -1, H * D])], name=f"blk.{i}.attn_heads")

    def gqa(self, i, q, k, v, past, present, ctx) -> str:
        """One com.microsoft.GroupQueryAttention node (rotary in rotate-half form from the cos/sin
        cache of this layer's RoPE base, KV append, a sliding layer's local window)."""
        ir, g, TP = self.ir, self.g, self.TP
        hp = ir.hparams
        c, theta = ctx.setdefault("gqa", {}), hp.layer_rope_theta(i)
        if not c:
            c["total32"] = g.op("Cast", [ctx["total"]], name="total_i32", to=TP.INT32)  # (1,)
        if theta not in c:  # one cos/sin cache per RoPE base
            n = min(self.w.max_positions, int(hp.max_position_embeddings))
            ang = np.arange(n, dtype=np.float32)[:, None] * rope_inv_freq(hp.head_dim, theta)[None, :]
            c[theta] = (g.init(g.name("rope.cos_cache"), np.cos(ang).astype(np.float32)),
                        g.init(g.name("rope.sin_cache"), np.sin(ang).astype(np.float32)))
        if "seqlens_k" not in c:  # (after the first cache: the initializer order of earlier graphs)
            c["seqlens_k"] = g.op("Sub", [c["total32"], g.const([1], np.int32)], name="seqlens_k")
            c["total"] = g.op("Squeeze", [c["total32"], g.const([0])], name="total_seq_len")
        window = {"local_window_size": blocks.gqa_window(hp, i)} if hp.is_sliding(i) else {}
        o = g.op("GroupQueryAttention", [q, k, v, past[0], past[1], c["seqlens_k"], c["total"], *c[theta]],
                 name=f"blk.{i}.gqa", domain=MS_DOMAIN, outputs=[f"blk.{i}.attn_out", present[0], present[1]],
                 num_heads=hp.num_heads, kv_num_heads=hp.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                 scale=float(hp.attention_scale), **window)
        return o[0]  # (1, S, H*D)

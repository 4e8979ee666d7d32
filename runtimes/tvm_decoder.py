"""The compiled decode token of a TVM artifact: the whole decoder in the kernel library.

Artifacts whose manifest lists ``tvm.decoder`` (CPU targets, edgeq/kernels/tir_decoder.py) carry,
next to the matmul kernels, compiled functions for the embedding row, RMSNorm, the residual add +
next norm, attention over the KV cache (bias, rate masks, RoPE, cache store, softmax) and the
gated MLP activation (SwiGLU; Gemma 3: GeGLU, QK-norm, sandwich post-norms, embedding scale,
sliding windows). A decode token is then a fixed list of calls into the library — embed, norm,
and per layer Q|K|V kernel, attention, O kernel, add + norm, gate|up kernel, GLU, down kernel,
add + norm, then the head kernel — on buffers allocated once
(64-byte aligned, as TVM's DLPack import requires), with the position and the token id in a
2-element int32 ``state`` buffer, so the only numpy work per token is writing ``state`` and
copying the logits out.

The pruning rate stays a run-time choice: each rate has its own call list (built on first use,
then cached), which passes the kernels the rate's active MLP width through the shapes of
``gate|up`` / ``act`` buffer views (prefixes of one allocation) and the attention its Q/K/V and O
masks and the O / down bias plus the rate's bias compensation row. No weight is copied per rate.
"""
from __future__ import annotations

import time

import numpy as np

from edgeq.errors import EdgeqError

ALIGN = 64
ATT_PAD = 8  # the attention's softmax runs 8 positions a step (edgeq.kernels.tir_decoder.LANES)


def aligned(shape, dtype=np.float32, fill: float = 0.0) -> np.ndarray:
    """A C-contiguous array whose data is ``ALIGN``-byte aligned."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    pad = (-raw.ctypes.data) % ALIGN
    a = raw[pad:pad + n].view(dt).reshape(shape)
    a[...] = fill
    return a


class CompiledDecoder:
    """Buffers and per-rate call lists of a :class:`runtimes.tvmrt.TvmSession`'s decode token."""

    def __init__(self, session, names: dict):
        self.s = s = session
        tvm = s._tvm
        hp = s.hp
        try:
            self.fn = {role: s.lib[name] for role, name in names.items()}
        except Exception:
            raise EdgeqError(f"{s.root}: the kernel library has no decoder function among "
                             f"{sorted(names.values())}") from None
        self._to = lambda a: tvm.runtime.from_dlpack(a)
        H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
        self.np = {"x": aligned((1, hp.hidden_size)), "h": aligned((1, hp.hidden_size)),
                   "y": aligned((1, hp.hidden_size)), "qkv": aligned((1, (H + 2 * KV) * D)),
                   "o": aligned((1, H * D)), "att": aligned((H, s.n_ctx + ATT_PAD)), "state": aligned((2,), np.int32),
                   "logits": aligned((1, hp.vocab_size)),
                   "gu": aligned((2 * hp.intermediate_size,)), "act": aligned((hp.intermediate_size,))}
        self.dev = {k: self._to(v) for k, v in self.np.items() if k not in ("gu", "act")}
        self.dev["kc"], self.dev["vc"] = self._to(s._k), self._to(s._v)
        self._views: dict[int, tuple] = {}  # MLP width -> (gate|up view (1, 2f), act view (1, f)) as tensors
        self._consts: dict = {}  # small per-layer vectors as aligned private tensors, by key
        self._plans: dict[int, list] = {}  # rate index -> the token's calls
        self.timers = None  # {label: seconds} while a breakdown times the calls

    # ---- buffers -----------------------------------------------------------------------------------
    def _mlp(self, f: int):
        if f not in self._views:
            gu = self.np["gu"][:2 * f].reshape(1, 2 * f)
            act = self.np["act"][:f].reshape(1, f)
            self._views[f] = (self._to(gu), self._to(act))
        return self._views[f]

    def _const(self, key, make):
        """An aligned private copy of a small vector (the weights file's views are read-only)."""
        if key not in self._consts:
            self._consts[key] = self._to(self._aligned_copy(np.ascontiguousarray(make(), dtype=np.float32)))
        return self._consts[key]

    # ---- the token's calls ---------------------------------------------------------------------------
    def plan(self, index: int) -> list:
        if index not in self._plans:
            self._plans[index] = self._build(index)
        return self._plans[index]

    def _build(self, index: int) -> list:
        s, hp, dev, fn = self.s, self.s.hp, self.dev, self.fn
        H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
        QKV, hid = (H + 2 * KV) * D, hp.hidden_size
        rate = s._rates[index]
        ffn = s._ffn_widths(rate)
        masks = s._masks[rate] if s._masks is not None else None
        layers, freqs = s._consts if s._consts is not None else s._layer_consts()
        s._consts = (layers, freqs)
        eps, scale, escale = float(hp.rms_norm_eps), float(hp.attention_scale), float(hp.embedding_scale)
        win = int(hp.sliding_window or 0)
        zeros = {n: self._const(("zeros", n), lambda n=n: np.zeros(n, np.float32)) for n in (hid, QKV)}
        ones = {n: self._const(("ones", n), lambda n=n: np.ones(n, np.float32)) for n in (QKV, H * D)}

        def kern(name):
            (decode, _), args = s._kernels[name]
            return decode, args

        def vec(key, parts):  # None parts -> the shared zeros / ones
            return self._const(key, lambda: np.concatenate(parts))

        x, h, y = dev["x"], dev["h"], dev["y"]
        calls = [("embed", -1, fn["embed"], (s._dev["token_embd.qw"], s._dev["token_embd.sc"], dev["state"], x,
                                            escale)),
                 ("norm", -1, fn["norm"], (x, self._const(("n1", 0), lambda: layers[0][0]), h, eps))]
        for li, (n1, n2, b_qkv, b_o, b_gu, b_d, rb_o, rb_d, qn, kn, pn_a, pn_f, rg) in enumerate(layers):
            row = index
            m = masks[li] if masks is not None else (None, None, None, None)
            bq = zeros[QKV] if b_qkv is None else self._const(("bqkv", li), lambda b=b_qkv: b)
            if all(v is None for v in m[:3]):
                mq = ones[QKV]
            else:
                qkv_parts = [m[0] if m[0] is not None else np.ones(H * D, np.float32),
                             m[1] if m[1] is not None else np.ones(KV * D, np.float32),
                             m[2] if m[2] is not None else np.ones(KV * D, np.float32)]
                mq = vec(("mqkv", li, index), qkv_parts)
            mo = ones[H * D] if m[3] is None else self._const(("mo", li, index), lambda v=m[3]: v)
            bo = self._bias(("bo", li, index), hid, b_o, rb_o, row, zeros[hid])
            bd = self._bias(("bd", li, index), hid, b_d, rb_d, row, zeros[hid])
            f = ffn[li]
            gu, act = self._mlp(f)
            bgu = (self._const(("bgu0", 2 * f), lambda f=f: np.zeros(2 * f, np.float32)) if b_gu is None
                   else self._const(("bgu", li), lambda b=b_gu: b))
            cs, sn = self._rope(rg, freqs[rg])
            nxt = (self._const(("n1", li + 1), lambda li=li: layers[li + 1][0]) if li + 1 < len(layers)
                   else self._const(("output_norm",), lambda: s._np["output_norm"]))
            n2d = self._const(("n2", li), lambda v=n2: v)
            # Gemma 3: QK-norm weights (+ eps) after the attention's scalars, the layer's window,
            # the sandwich norms through post_add_norm
            qkn = ((self._const(("qn", li), lambda v=qn: v), self._const(("kn", li), lambda v=kn: v))
                   if qn is not None else ())
            att_tail = (li, scale, win if hp.is_sliding(li) else 0) + ((eps,) if qn is not None else ())
            qf, qa = kern(f"blk.{li}.qkv")
            of, oa = kern(f"blk.{li}.o")
            gf, ga = kern(f"blk.{li}.gate_up")
            df, da = kern(f"blk.{li}.down")
            calls += [("kernel qkv", li, qf, (h, *qa, dev["qkv"])),
                      ("attention", li, fn["attention"], (dev["qkv"], bq, mq, cs, sn, dev["kc"], dev["vc"], dev["att"],
                                                          dev["state"], mo, dev["o"], *qkn, *att_tail)),
                      ("kernel o", li, of, (dev["o"], *oa, y)),
                      self._residual(li, x, y, bo, pn_a, n2d, h, eps),
                      ("kernel gate_up", li, gf, (h, *ga, gu)),
                      ("glu", li, fn["glu"], (gu, bgu, act)),
                      ("kernel down", li, df, (act, *da, y)),
                      self._residual(li, x, y, bd, pn_f, nxt, h, eps, after_mlp=True)]
        hf, ha = kern("token_embd" if hp.tie_word_embeddings else "output")
        calls.append(("kernel head", -1, hf, (h, *ha, dev["logits"])))
        return calls

    def _rope(self, group: int, f: np.ndarray):
        """cos / sin tables (n_ctx, KV, half) of every position for one pair-frequency table, as the
        numpy decoder computes them (float32 ``pos * f``, float32 cos / sin): made once, shared by
        the layers with the same pair order and RoPE base."""
        key = ("rope", group)
        if key not in self._consts:
            ang = np.arange(self.s.n_ctx, dtype=np.float32)[:, None, None] * f.astype(np.float32)[None]
            self._consts[key] = (self._to(self._aligned_copy(np.cos(ang))), self._to(self._aligned_copy(np.sin(ang))))
        return self._consts[key]

    @staticmethod
    def _aligned_copy(v: np.ndarray) -> np.ndarray:
        a = aligned(v.shape, v.dtype)
        a[...] = v
        return a

    def _residual(self, li, x, y, b, post_norm, w, h, eps, after_mlp=False):
        """``x += y + b`` (Gemma 3: ``x += rmsnorm(y + b) * post_norm``), then ``h = rmsnorm(x) * w``."""
        if post_norm is None:
            return ("add+norm", li, self.fn["add_norm"], (x, y, b, w, h, eps))
        pw = self._const(("post", li, after_mlp), lambda: post_norm)
        return ("add+norm", li, self.fn["post_add_norm"], (x, y, b, pw, w, h, eps))

    def _bias(self, key, n, b, rate_bias, row, zeros):
        if b is None and rate_bias is None:
            return zeros

        def make():
            v = np.zeros(n, np.float32)
            if b is not None:
                v += b
            if rate_bias is not None:
                v += rate_bias[row]
            return v

        return self._const(key, make)

    # ---- one token -----------------------------------------------------------------------------------
    def step(self, token: int, pos: int, index: int) -> np.ndarray:
        """Logits (vocab,) of ``token`` at position ``pos`` (its K/V written into the cache)."""
        st = self.np["state"]
        st[0] = pos
        st[1] = token
        calls = self.plan(index)
        if self.timers is None:
            for _, _, f, args in calls:
                f(*args)
        else:
            for label, li, f, args in calls:
                t = time.perf_counter()
                f(*args)
                self.timers[(li, label)] = self.timers.get((li, label), 0.0) + time.perf_counter() - t
        return self.np["logits"][0].copy()

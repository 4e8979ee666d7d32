"""Reference runtime: executes a ModelIR directly with numpy (Llama / Qwen2 / Gemma 3), KV cache included.

The oracle for every other runtime: logits match ``transformers`` in fp32 (tests/runtimes).
Low-rank branches (LoRA kept separate, error compensation) are applied as extra small GEMMs.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import LayerWidths, Linear, ModelIR, Role, full_widths
from runtimes.base import Session, check_last, check_tokens
from runtimes.text import SpecTextMixin


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (PyTorch's ``gelu(approximate="tanh")``)."""
    c = x.dtype.type(np.sqrt(2.0 / np.pi))
    return x.dtype.type(0.5) * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def head_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of each head of ``x`` (T, n, 2, p) over its (2, p) dims; ``w`` (2, p)."""
    var = np.mean(x * x, axis=(2, 3), keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    # as transformers computes it, in float32
    return (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                         / np.float32(head_dim)))).astype(np.float32)


def pruning_layout(hp) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(q_rows, k_rows, v_rows, o_cols): the order of Q/K/V's output rows and of O's input
    columns in the pruning-aware layout. Q/K rows are ordered (pair slot, half, head), V rows
    (component, kv group), O columns (component, head): a pruning rate keeps a prefix of each."""
    H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
    half = D // 2
    q_rows = np.array([h * D + hf * half + s for s in range(half) for hf in (0, 1) for h in range(H)])
    k_rows = np.array([h * D + hf * half + s for s in range(half) for hf in (0, 1) for h in range(KV)])
    v_rows = np.array([g * D + c for c in range(D) for g in range(KV)])
    o_cols = np.array([h * D + c for c in range(D) for h in range(H)])
    return q_rows, k_rows, v_rows, o_cols


def layout_moves(role: Role, kind: str) -> bool:
    """Whether :func:`to_runtime_layout` changes this array (else it is used as is)."""
    return ((role in (Role.Q, Role.K, Role.V) and kind in ("weight", "bias", "b"))
            or (role == Role.O and kind in ("weight", "a")) or (role == Role.DOWN and kind == "weight"))


def to_runtime_layout(hp, role: Role, kind: str, a):
    """One array of a linear (``kind``: "weight", "bias", "a" or "b" of a low-rank branch) in
    natural order -> as :class:`LayerWeights` holds it: rows of Q/K/V and of their biases and B
    factors permuted, O's weight columns permuted and transposed (``wo_t``), O's A factors'
    columns permuted, ffn_down's weight transposed (``wd_t``); everything else as is."""
    q_rows, k_rows, v_rows, o_cols = pruning_layout(hp)
    rows = {Role.Q: q_rows, Role.K: k_rows, Role.V: v_rows}.get(role)
    if rows is not None and kind in ("weight", "bias", "b"):
        return np.asarray(a)[rows]
    if role == Role.O and kind == "weight":
        return np.asarray(a)[:, o_cols].T
    if role == Role.O and kind == "a":
        return np.asarray(a)[:, o_cols]
    if role == Role.DOWN and kind == "weight":
        return np.asarray(a).T
    return a


def from_runtime_layout(hp, role: Role, kind: str, a):
    """The inverse of :func:`to_runtime_layout` (a view where it is a transpose)."""
    q_rows, k_rows, v_rows, o_cols = pruning_layout(hp)
    rows = {Role.Q: q_rows, Role.K: k_rows, Role.V: v_rows}.get(role)
    if rows is not None and kind in ("weight", "bias", "b"):
        return np.asarray(a)[np.argsort(rows)]
    if role == Role.O and kind == "weight":
        return np.asarray(a).T[:, np.argsort(o_cols)]
    if role == Role.O and kind == "a":
        return np.asarray(a)[:, np.argsort(o_cols)]
    if role == Role.DOWN and kind == "weight":
        return np.asarray(a).T
    return a


class _Branches:
    """Low-rank branches of one linear in the pruning-aware layout."""

    def __init__(self, hp, lin: Linear, dtype, laid_out: bool = False):
        self.items = []
        for lr in lin.low_rank:
            a, b = lr.a, lr.b
            if not laid_out:
                a, b = (to_runtime_layout(hp, lin.role, k, x) for k, x in (("a", a), ("b", b)))
            self.items.append((np.ascontiguousarray(a, dtype=dtype), np.ascontiguousarray(b, dtype=dtype),
                               dtype(lr.scale)))

    def add(self, y, x, n_out=None, n_in=None):
        for a, b, s in self.items:
            aa = a if n_in is None else a[:, :n_in]
            bb = b if n_out is None else b[:n_out]
            y = y + ((x @ aa.T) @ bb.T) * s
        return y


class LayerWeights:
    """One layer's weights in the pruning-aware layout: every supported rate is a prefix view.

    Q/K rows are ordered (pair slot, half, head), V rows (component, kv group), O is stored
    transposed with rows (component, head), ffn_down transposed; so a rate keeps the first
    rows of each matrix and nothing is ever copied on a rate switch (:func:`pruning_layout`,
    :func:`to_runtime_layout`).

    ``laid_out``: the IR's linears are already in that layout, O's and ffn_down's weights as
    transposed views (``to_runtime_layout(..).T``): a reference artifact of format 2, memory-mapped;
    its float32 weights are then used in place, never copied. Otherwise (an IR in natural
    order) they are permuted copies.
    """

    def __init__(self, ir: ModelIR, i: int, dtype, store=None, laid_out: bool = False, contiguous: bool = True):
        """``store``: dtype of the seven weight matrices (default ``dtype``); a float32 store with a
        float64 ``dtype`` computes in float64 from float32 weights (half the memory, same values).
        ``contiguous=False``: O's and ffn_down's transposes stay views (BLAS reads them transposed;
        same products), for a layer used for one pass — copying them transposed is most of the cost
        of preparing a big layer, and only a decode loop gains from row-contiguous weights."""
        hp = ir.hparams
        KV, half = hp.num_kv_heads, hp.head_dim // 2
        self.q_rows, self.k_rows, self.v_rows, self.o_cols = pruning_layout(hp)
        lins = {r: ir.linear(i, r) for r in (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)}

        def arr(role, kind, dt):
            lin = lins[role]
            a = lin.weight if kind == "weight" else lin.bias
            if a is None:
                return None
            if laid_out:
                a = a.T if kind == "weight" and role in (Role.O, Role.DOWN) else a
            else:
                a = to_runtime_layout(hp, role, kind, a)
            if not contiguous:
                return np.asarray(a, dtype=dt)  # keeps a transpose's memory order (no strided copy)
            return np.ascontiguousarray(a, dtype=dt)  # a view when already contiguous in dtype ``dt``

        w, b = store or dtype, dtype
        self.wq, self.wk, self.wv = arr(Role.Q, "weight", w), arr(Role.K, "weight", w), arr(Role.V, "weight", w)
        self.bq, self.bk, self.bv = arr(Role.Q, "bias", b), arr(Role.K, "bias", b), arr(Role.V, "bias", b)
        self.wo_t = arr(Role.O, "weight", w)  # (D*H, hidden), rows (component, head)
        self.bo = arr(Role.O, "bias", b)
        self.wg, self.wu, self.wd_t = arr(Role.GATE, "weight", w), arr(Role.UP, "weight", w), arr(Role.DOWN, "weight", w)
        self.bg, self.bu, self.bd = arr(Role.GATE, "bias", b), arr(Role.UP, "bias", b), arr(Role.DOWN, "bias", b)
        self.lr = {r: _Branches(hp, lin, dtype, laid_out) for r, lin in lins.items()}
        self.attn_norm = np.asarray(ir.tensors[f"blk.{i}.attn_norm"], dtype=dtype)
        self.ffn_norm = np.asarray(ir.tensors[f"blk.{i}.ffn_norm"], dtype=dtype)
        idx = ir.rope_index.get(i)
        self.rope_index = np.tile(np.arange(half), (KV, 1)) if idx is None else np.asarray(idx)
        # Gemma's blocks: QK-norm weights in the (half, pair slot) order of a head's rows, the
        # sandwich norms, the sliding window and the layer's own RoPE base
        self.q_norm = self.k_norm = self.post_attn_norm = self.post_ffw_norm = None
        if hp.qk_norm:
            if idx is not None:
                raise EdgeqError("QK-norm models cannot carry a sorted RoPE-pair order (pruning is "
                                 "not supported for them)")
            self.q_norm, self.k_norm = (np.asarray(ir.tensors[f"blk.{i}.{n}"], dtype=dtype).reshape(2, half)
                                        for n in ("attn_q_norm", "attn_k_norm"))
        if hp.sandwich_norm:
            self.post_attn_norm = np.asarray(ir.tensors[f"blk.{i}.post_attention_norm"], dtype=dtype)
            self.post_ffw_norm = np.asarray(ir.tensors[f"blk.{i}.post_ffw_norm"], dtype=dtype)
        self.window = hp.sliding_window if hp.is_sliding(i) else None
        theta = hp.layer_rope_theta(i)
        self.inv_freq = None if theta == hp.rope_theta else rope_inv_freq(hp.head_dim, theta)

    def buffers(self) -> list[np.ndarray]:
        return [self.wq, self.wk, self.wv, self.wo_t, self.wg, self.wu, self.wd_t]

    @staticmethod
    def _lin(x, w, b, n_rows, branches, role_kw):
        y = x @ w[:n_rows].T
        if b is not None:
            y = y + b[:n_rows]
        return branches.add(y, x, **role_kw) if branches.items else y


def cos_sin(inv_freq: np.ndarray, L: LayerWeights, pos: np.ndarray, p: int, dtype):
    """cos/sin of shape (T, KV, p) for the first p sorted pair slots of each KV group."""
    freqs = inv_freq[L.rope_index[:, :p]]  # (KV, p)
    ang = pos.astype(np.float32)[:, None, None] * freqs[None]
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def apply_rope(x, cos, sin):
    # x: (T, n, 2, p) [half 0 | half 1] per head; cos/sin: (T, n, p)
    x0, x1 = x[:, :, 0, :], x[:, :, 1, :]
    return np.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=2)


def layer_rate_bias(hp, L: LayerWeights, means, w: LayerWidths, dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """Bias compensation of one layer at widths ``w`` (``edgeq.passes.prune_bias``), computed from
    the runtime's own layout: (b_o, b_down) in ``dtype``, the mean contribution of the o_proj /
    ffn_down inputs ``w`` drops (float64 sums), or None when nothing is dropped or ``means``
    (an ``edgeq.ir.LayerMeans``, IR column order) is None."""
    H, D, F = hp.num_heads, hp.head_dim, hp.intermediate_size
    if means is None or (w.ffn >= F and w.v_dims >= D):
        return None
    b_o, b_d = np.zeros(hp.hidden_size), np.zeros(hp.hidden_size)
    if w.ffn < F:
        m = np.asarray(means.down, dtype=np.float64)[w.ffn:]
        b_d = m @ np.asarray(L.wd_t[w.ffn:], dtype=np.float64)
        for a, b, s in L.lr[Role.DOWN].items:
            b_d = b_d + float(s) * ((m @ np.asarray(a[:, w.ffn:], dtype=np.float64).T) @ np.asarray(b, dtype=np.float64).T)
    if w.v_dims < D:
        n_in = w.v_dims * H  # O's inputs in the runtime order (component, head): a prefix is kept
        m = np.asarray(means.o, dtype=np.float64)[L.o_cols][n_in:]
        b_o = m @ np.asarray(L.wo_t[n_in:], dtype=np.float64)
        for a, b, s in L.lr[Role.O].items:
            b_o = b_o + float(s) * ((m @ np.asarray(a[:, n_in:], dtype=np.float64).T) @ np.asarray(b, dtype=np.float64).T)
    return b_o.astype(np.float32).astype(dtype), b_d.astype(np.float32).astype(dtype)


def o_proj(L: LayerWeights, o, n_in):
    y = o @ L.wo_t[:n_in]
    if L.bo is not None:
        y = y + L.bo
    if L.lr[Role.O].items:
        y = L.lr[Role.O].add(y, o, n_in=n_in)
    return y


# What layer_forward hands its ``taps`` callable, in call order: the inputs of every linear (per
# row of ``x``) and the Q/K projections before RoPE, all in the runtime layout (LayerWeights).
TAPS = (
    "attn_in",  # (T, hidden): the attention input after attn_norm, input of q/k/v_proj
    "q",  # (T, 2 * qk_pairs * H): q_proj output pre-RoPE (biases, low-rank branches), rows (pair slot, half, head)
    "k",  # (T, 2 * qk_pairs * KV): k_proj output pre-RoPE, rows (pair slot, half, kv head)
    "o_in",  # (T, v_dims * H): the attention output, input of o_proj, columns (component, head)
    "ffn_in",  # (T, hidden): the MLP input after ffn_norm, input of gate/up_proj
    "down_in",  # (T, ffn): silu(gate) * up, input of down_proj
)


def layer_forward(hp, L: LayerWeights, x: np.ndarray, start: int, w: LayerWidths, kcache: np.ndarray,
                  vcache: np.ndarray, inv_freq: np.ndarray, dtype, timers: dict | None = None,
                  pos: np.ndarray | None = None, mask: np.ndarray | None = None,
                  taps: Callable[[str, np.ndarray], None] | None = None,
                  rate_bias: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """One decoder layer on ``x`` (T, hidden) at positions ``start..start+T``: writes this layer's
    K/V into ``kcache`` (n_ctx, KV, 2, half) / ``vcache`` (n_ctx, KV, head_dim) and returns the new
    residual stream. ``w``: the widths kept at the current pruning rate.

    ``pos`` / ``mask`` (RoPE positions of the T rows, additive (T, start+T) attention mask) replace
    the causal defaults: several sequences packed into one call (:func:`streamed_logits`).
    ``taps``: called as ``taps(name, activation)`` with each activation of :data:`TAPS` (read it,
    do not keep or change it); calibration's statistics come from here. Timers (``timers``:
    seconds added under "attention" / "mlp") are the other hook. ``rate_bias``: (b_o, b_down)
    added to o_proj's and ffn_down's outputs (bias compensation at this rate, :func:`layer_rate_bias`)."""
    T = x.shape[0]
    H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
    group = H // KV
    scale = dtype(hp.attention_scale)  # of the original head_dim, whatever is kept
    end = start + T
    if L.inv_freq is not None:  # a layer with its own RoPE base (Gemma's sliding layers)
        inv_freq = L.inv_freq
    if mask is None:
        mask = np.triu(np.full((T, end), -np.inf, dtype=dtype), k=start + 1)
    if L.window is not None:  # keys at or beyond the window behind each query are masked
        kpos = np.arange(end) if pos is None else pos
        qpos = np.arange(start, end) if pos is None else pos
        if kpos.shape[0] != end:
            raise EdgeqError("sliding-window attention needs the key positions: pass pos for every cached row")
        mask = np.where(qpos[:, None] - kpos[None, :] >= L.window, -np.inf, mask).astype(dtype)
    pos = np.arange(start, start + T) if pos is None else pos
    if timers is not None:
        t0 = time.perf_counter()
    p, nv, f = w.qk_pairs, w.v_dims, w.ffn
    h = rms_norm(x, L.attn_norm, hp.rms_norm_eps)
    cos, sin = cos_sin(inv_freq, L, pos, p, dtype)
    q = L._lin(h, L.wq, L.bq, p * 2 * H, L.lr[Role.Q], {"n_out": p * 2 * H})
    if taps is not None:
        taps("attn_in", h)
        taps("q", q)
    q = q.reshape(T, p, 2, H).transpose(0, 3, 2, 1)  # (T, H, 2, p)
    if L.q_norm is not None:
        q = head_rms_norm(q, L.q_norm[:, :p], hp.rms_norm_eps)
    q = apply_rope(q, np.repeat(cos, group, axis=1), np.repeat(sin, group, axis=1))
    k = L._lin(h, L.wk, L.bk, p * 2 * KV, L.lr[Role.K], {"n_out": p * 2 * KV})
    if taps is not None:
        taps("k", k)
    k = k.reshape(T, p, 2, KV).transpose(0, 3, 2, 1)
    if L.k_norm is not None:
        k = head_rms_norm(k, L.k_norm[:, :p], hp.rms_norm_eps)
    k = apply_rope(k, cos, sin)
    v = L._lin(h, L.wv, L.bv, nv * KV, L.lr[Role.V], {"n_out": nv * KV})
    v = v.reshape(T, nv, KV).transpose(0, 2, 1)  # (T, KV, nv)
    kcache[start:end, :, :, :p] = k
    kcache[start:end, :, :, p:] = 0  # dims this rate drops are zero (not stale)
    vcache[start:end, :, :nv] = v
    vcache[start:end, :, nv:] = 0
    K = kcache[:end, :, :, :p]  # (end, KV, 2, p)
    V = vcache[:end, :, :nv]  # (end, KV, nv)
    qg = q.reshape(T, KV, group, 2, p)
    att = np.einsum("tkgjp,skjp->kgts", qg, K) * scale + mask
    att = att - att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    o = np.einsum("kgts,skc->tckg", att, V).reshape(T, nv * H)  # rows (component, head)
    if taps is not None:
        taps("o_in", o)
    y = o_proj(L, o, nv * H)
    if rate_bias is not None:  # bias compensation, on the projection's output (before a post-norm)
        y = y + rate_bias[0]
    if L.post_attn_norm is not None:
        y = rms_norm(y, L.post_attn_norm, hp.rms_norm_eps)
    x = x + y
    if timers is not None:
        t1 = time.perf_counter()
        timers["attention"] += t1 - t0
    h = rms_norm(x, L.ffn_norm, hp.rms_norm_eps)
    g = L._lin(h, L.wg, L.bg, f, L.lr[Role.GATE], {"n_out": f})
    u = L._lin(h, L.wu, L.bu, f, L.lr[Role.UP], {"n_out": f})
    a = ACTIVATIONS[hp.hidden_act](g) * u
    if taps is not None:
        taps("ffn_in", h)
        taps("down_in", a)
    y = a @ L.wd_t[:f]
    if L.bd is not None:
        y = y + L.bd
    if L.lr[Role.DOWN].items:
        y = L.lr[Role.DOWN].add(y, a, n_in=f)
    if rate_bias is not None:
        y = y + rate_bias[1]
    if L.post_ffw_norm is not None:
        y = rms_norm(y, L.post_ffw_norm, hp.rms_norm_eps)
    x = x + y
    if timers is not None:
        timers["mlp"] += time.perf_counter() - t1
    return x


class ReferenceSession(SpecTextMixin, Session):
    name = "reference"

    def __init__(self, ir: ModelIR, n_ctx: int = 2048, dtype=np.float32, laid_out: bool = False):
        """``laid_out``: ``ir``'s linears are in the runtime's layout (:class:`LayerWeights`; a
        memory-mapped reference artifact of format 2): float32 weights are used in place, the
        output head too (as a transposed view), so the weights stay file-backed pages."""
        ir.validate()
        self.ir = ir
        self.hp = hp = ir.hparams
        self.dtype = dtype
        self.n_ctx = n_ctx
        self.embd = np.asarray(ir.tensors["token_embd"], dtype=dtype)
        if laid_out:
            self.out_t = np.asarray(ir.output_weight(), dtype=dtype).T
        else:  # a contiguous copy, as every existing number was computed
            self.out_t = np.ascontiguousarray(ir.output_weight().T, dtype=dtype)
        self.out_norm = np.asarray(ir.tensors["output_norm"], dtype=dtype)
        self.layers = [LayerWeights(ir, i, dtype, laid_out=laid_out) for i in range(hp.num_layers)]
        self.inv_freq = rope_inv_freq(hp.head_dim, hp.rope_theta)
        half = hp.head_dim // 2
        self._k = np.zeros((hp.num_layers, n_ctx, hp.num_kv_heads, 2, half), dtype=dtype)
        self._v = np.zeros((hp.num_layers, n_ctx, hp.num_kv_heads, hp.head_dim), dtype=dtype)
        self._ids = np.zeros(n_ctx, dtype=np.int64)
        self._pos = 0
        self._full_widths = (full_widths(hp),) * hp.num_layers
        self.prune_rate, self.widths = 0.0, self._full_widths
        # bias compensation (ir.prune_means): per carried rate, per layer (b_o, b_down) or None
        self._rate_bias = {}
        if ir.prune is not None and ir.prune_means:
            self._rate_bias = {r: tuple(layer_rate_bias(hp, L, ir.prune_means.get(li), ir.prune.widths[r][li], dtype)
                                        for li, L in enumerate(self.layers)) for r in ir.prune.rates}
        self.biases = (None,) * hp.num_layers
        self.timers = None  # {layer: {"attention": s, "mlp": s}} accumulated when a dict (edgeq.breakdown)

    # ---- text (SpecTextMixin) ---------------------------------------------------------------
    def _tokenizer_spec(self):
        return self.ir.tokenizer

    # ---- pruning ------------------------------------------------------------------------------
    def set_prune_rate(self, rate: float, kv: str = "keep") -> None:
        """Switch the pruning rate; takes effect on the next token, without copying weights.

        KV cache on a switch: ``kv="keep"`` (default) keeps the cached positions as computed at
        their own rate — K/V dims a smaller rate drops are ignored, dims a larger rate adds
        are zero for old positions (they contribute nothing to attention scores / outputs);
        ``kv="recompute"`` re-evaluates the cached tokens at the new rate, so the context is
        exactly what a fresh run at that rate would hold.
        """
        if kv not in ("keep", "recompute"):
            raise EdgeqError(f"kv policy must be 'keep' or 'recompute', got {kv!r}")
        if self.ir.prune is None:
            if rate != 0:
                raise EdgeqError(f"pruning rate {rate:g} is not carried by this model (it carries only 0)")
            widths = self._full_widths
        else:
            widths = self.ir.prune.at(rate)
        key = next((r for r in self._rate_bias if abs(r - rate) < 1e-9), None)
        self.biases = self._rate_bias[key] if key is not None else (None,) * self.hp.num_layers
        self.prune_rate, self.widths = float(rate), widths
        if kv == "recompute" and self._pos > 0:
            ids = list(self._ids[: self._pos])
            self._k[:] = 0
            self._v[:] = 0
            self._forward(ids, 0)

    @property
    def prune_rates(self) -> tuple[float, ...]:
        return (0.0,) if self.ir.prune is None else tuple(self.ir.prune.rates)

    def weight_buffers(self) -> list[np.ndarray]:
        return [b for L in self.layers for b in L.buffers()]

    def resident_weight_bytes(self, rate: float | None = None) -> int:
        """Bytes of weights a run at ``rate`` touches (prefixes of the prunable tensors)."""
        widths = self.widths if rate is None else (self.ir.prune.at(rate) if self.ir.prune else self._full_widths)
        hp, it = self.hp, np.dtype(self.dtype).itemsize
        H, KV, h = hp.num_heads, hp.num_kv_heads, hp.hidden_size
        n = self.embd.size + (0 if hp.tie_word_embeddings else self.out_t.size)
        for w in widths:
            n += h * (2 * w.qk_pairs * (H + KV) + w.v_dims * (KV + H) + 3 * w.ffn)
        return n * it

    # ---- compute -----------------------------------------------------------------------------
    def _forward(self, ids: Sequence[int], start: int) -> np.ndarray:
        hp = self.hp
        ids = check_tokens(ids, hp.vocab_size, start, self.n_ctx)
        T = ids.size
        self._ids[start:start + T] = ids
        x = self.embd[ids]
        if hp.embedding_scale != 1.0:
            x = x * self.dtype(hp.embedding_scale)
        timers = self.timers
        for li, L in enumerate(self.layers):
            x = layer_forward(hp, L, x, start, self.widths[li], self._k[li], self._v[li], self.inv_freq,
                              self.dtype, None if timers is None else timers[li], rate_bias=self.biases[li])
        x = rms_norm(x, self.out_norm, hp.rms_norm_eps)
        return x

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        x = self._forward(token_ids, 0)
        self._pos = len(token_ids)
        return (x @ self.out_t).astype(np.float32)

    def last_logits(self, token_ids: Sequence[int], n: int) -> np.ndarray:
        check_last(n, len(token_ids))
        x = self._forward(token_ids, 0)
        self._pos = len(token_ids)
        return (x[-n:] @ self.out_t).astype(np.float32)

    def _start(self, prompt_ids: Sequence[int]) -> np.ndarray:
        x = self._forward(prompt_ids, 0)
        self._pos = len(prompt_ids)
        return (x[-1] @ self.out_t).astype(np.float32)

    def _step(self, token_id: int) -> np.ndarray:
        x = self._forward([token_id], self._pos)
        self._pos += 1
        return (x[-1] @ self.out_t).astype(np.float32)


# Vocabulary rows of the output matrix multiplied at once by streamed_logits (bounded memory).
HEAD_CHUNK_ROWS = 8192


# streamed_logits keeps a layer's weights in the arithmetic dtype (converted once, shared by the
# sequences) while that layer is at most this large, else in float32 (converted per matmul). Its
# default arithmetic (``dtype=None``) is float64 while a layer's float64 weights fit in this many
# bytes, float32 above (Llama-3.1-8B's layers: float64 would mean 1.75 GB per layer, or a float64
# copy of each float32 matrix per product; float32 is 4-5x faster there, and its rounding, ~1e-6
# relative, is far below what any quantized format's check measures).
STORE_WIDE_MAX_BYTES = 1 << 30


def streamed_dtypes(layer_values: int, dtype=None) -> tuple[np.dtype, np.dtype]:
    """(arithmetic, weight store) dtypes of :func:`streamed_logits` for layers of ``layer_values``
    weight values (``dtype``: the arithmetic when given, else the default; see STORE_WIDE_MAX_BYTES)."""
    dtype = np.dtype(dtype if dtype is not None else np.float64 if layer_values * 8 <= STORE_WIDE_MAX_BYTES
                     else np.float32)
    store = dtype if layer_values * dtype.itemsize <= STORE_WIDE_MAX_BYTES else np.dtype(np.float32)
    return dtype, store


def streamed_dtype(ir: ModelIR) -> np.dtype:
    """The arithmetic :func:`streamed_logits` uses by default for ``ir`` (see STORE_WIDE_MAX_BYTES)."""
    return streamed_dtypes(sum(ir.linear(0, r).weight.size for r in Role))[0]


def streamed_logits(ir: ModelIR, sequences: Sequence[Sequence[int]], rate: float = 0.0, dtype=None,
                    store=None, progress=None) -> list[np.ndarray]:
    """Logits of every position of each sequence (each from a fresh context), computed layer by
    layer: one layer's weights are materialised (``store`` dtype — by default ``dtype`` while a
    layer is at most STORE_WIDE_MAX_BYTES, else float32 — computed in ``dtype``) for all
    sequences, then freed; the output matrix is applied in row chunks. Peak memory: one layer +
    the sequences' activations, whatever the depth or vocabulary (how goldens are recorded for
    models of any size). Same math as :class:`ReferenceSession` (the layer function is shared).

    ``progress``: optional callable ``(layer_index, num_layers)`` called after each layer."""
    hp = ir.hparams
    wide, narrow = streamed_dtypes(sum(ir.linear(0, r).weight.size for r in Role), dtype)
    dtype = wide.type
    widths = ir.prune.at(rate) if ir.prune is not None else (full_widths(hp),) * hp.num_layers
    if ir.prune is None and rate != 0:
        raise EdgeqError(f"pruning rate {rate:g} is not carried by this model (it carries only 0)")
    embd = ir.tensors["token_embd"]
    xs = []
    for seq in sequences:
        ids = check_tokens(seq, hp.vocab_size, 0, max(len(seq), 1))
        x = np.stack([np.asarray(embd[int(t):int(t) + 1], dtype=np.float32)[0] for t in ids]).astype(dtype)
        xs.append(x if hp.embedding_scale == 1.0 else x * dtype(hp.embedding_scale))
    inv_freq = rope_inv_freq(hp.head_dim, hp.rope_theta)
    half = hp.head_dim // 2
    if store is None:  # float32 weights widen exactly: either store computes the same values
        store = narrow.type
    # the sequences are packed into one block of rows (each linear reads a layer's weights once for
    # all of them); attention stays within each sequence (block-diagonal causal mask, own positions)
    lens = [x.shape[0] for x in xs]
    T = sum(lens)
    pos = np.concatenate([np.arange(n) for n in lens])
    seq = np.repeat(np.arange(len(lens)), lens)
    mask = np.where((seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None]), 0.0, -np.inf).astype(dtype)
    x = np.concatenate(xs, axis=0)
    del xs
    for li in range(hp.num_layers):
        L = LayerWeights(ir, li, dtype, store=store, contiguous=False)
        kc = np.zeros((T, hp.num_kv_heads, 2, half), dtype=dtype)
        vc = np.zeros((T, hp.num_kv_heads, hp.head_dim), dtype=dtype)
        bias = layer_rate_bias(hp, L, ir.prune_means.get(li), widths[li], dtype) if ir.prune_means else None
        x = layer_forward(hp, L, x, 0, widths[li], kc, vc, inv_freq, dtype, pos=pos, mask=mask, rate_bias=bias)
        del L
        if progress is not None:
            progress(li + 1, hp.num_layers)
    out_norm = ir.tensors["output_norm"].astype(dtype)
    bounds = np.cumsum([0] + lens)
    hs = [rms_norm(x[a:b], out_norm, hp.rms_norm_eps) for a, b in zip(bounds[:-1], bounds[1:])]
    head = ir.output_weight()
    logits = [np.empty((h.shape[0], hp.vocab_size), dtype=np.float32) for h in hs]
    for r0 in range(0, hp.vocab_size, HEAD_CHUNK_ROWS):
        w_t = np.asarray(head[r0:r0 + HEAD_CHUNK_ROWS], dtype=dtype).T
        for h, lg in zip(hs, logits):
            lg[:, r0:r0 + w_t.shape[1]] = (h @ w_t).astype(np.float32)
    return logits

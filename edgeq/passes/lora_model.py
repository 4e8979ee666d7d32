"""The torch forward of a ModelIR with trainable LoRA adapters, masked to a pruning rate.

Used by the recovery fine-tune (:mod:`edgeq.passes.recover`) and the planner's KL sensitivity
probe (:mod:`edgeq.quant.sensitivity`). It is a compact float32 torch implementation of
:mod:`runtimes.reference`'s forward (Llama / Qwen2 / Gemma 3), reading the frozen base weights
straight from the IR arrays (no copies). A rate keeps MLP channels ``[0:ffn]``, Q/K head dims
``[0:p] ∪ [d/2 : d/2+p]`` (p = kept RoPE pairs, each slot rotated at its original frequency
``inv_freq[rope_index[g][j]]``) and V/O components ``[0:v_dims]`` per KV group.

Gemma 3's blocks (``HParams.special_blocks``), as the reference runtime computes them: embeddings
scaled by ``embedding_scale`` (float32), GeGLU with tanh-GELU, per-head QK-norm before RoPE, the
sandwich norms on the attention / MLP outputs (bias compensation is added before them, as
deployed), ``query_pre_attn_scalar``'s attention scale, and sliding-window layers with their own
RoPE base. QK-norm normalises over the whole head dim, so a model with it runs with all Q/K pairs
(a rate that drops some is refused: such models are pruned in their MLP channels only).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError, require
from edgeq.ir import LayerWidths, ModelIR, PassRecord, Role, full_widths, linear_name
from runtimes.reference import rope_inv_freq

ROLES = (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)


def _full_widths(ir: ModelIR) -> tuple[LayerWidths, ...]:
    return (full_widths(ir.hparams),) * ir.hparams.num_layers


def widths_at(ir: ModelIR, rate: float) -> tuple[LayerWidths, ...]:
    """Every layer's kept widths at ``rate`` (rate 0 of an unpruned model keeps everything)."""
    if ir.prune is None:
        if rate != 0:
            raise EdgeqError(f"pruning rate {rate:g} is not carried by this model (it carries only 0)")
        return _full_widths(ir)
    return ir.prune.at(rate)


def _tensor(torch, a: np.ndarray):
    """A frozen float32 torch view of an IR array (no copy when it already is float32 C-order)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    with warnings.catch_warnings():  # read-only (memory-mapped) arrays: we never write to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class LoraModel:
    """Torch forward of a ModelIR with trainable LoRA adapters, masked to a pruning rate."""

    def __init__(self, ir: ModelIR, rank: int = 8, alpha: float = 16.0, seed: int = 0):
        torch = self.torch = require("torch", "frontend")
        ir.validate()
        self.ir = ir
        self.hp = hp = ir.hparams
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
        self.group, self.half = H // KV, D // 2
        t = lambda a: None if a is None else _tensor(torch, a)  # noqa: E731
        self.embd = t(ir.tensors["token_embd"])
        self.out_w = t(ir.output_weight())
        self.out_norm = t(ir.tensors["output_norm"])
        gen = torch.Generator().manual_seed(int(seed))
        self.base: list[dict] = []  # per layer: role -> (weight, bias, frozen low-rank branches)
        self.lora: list[dict] = []  # per layer: role -> (A, B) trainable
        self.norms: list[tuple] = []
        self.means: list[tuple | None] = []  # per layer: (o mean, down mean) float32, or None (no --prune-bias)
        self.rope_index: list[np.ndarray] = []
        for i in range(hp.num_layers):
            base, lora = {}, {}
            for role in ROLES:
                lin = ir.linear(i, role)
                frozen = [(t(lr.a), t(lr.b), float(lr.scale)) for lr in lin.low_rank]
                base[role] = (t(lin.weight), t(lin.bias), frozen)
                bound = 1.0 / math.sqrt(lin.in_features)  # PEFT's kaiming_uniform(a=sqrt(5)) for A
                a = (torch.rand(self.rank, lin.in_features, generator=gen) * 2 - 1) * bound
                b = torch.zeros(lin.out_features, self.rank)
                lora[role] = (a.requires_grad_(True), b.requires_grad_(True))
            self.base.append(base)
            self.lora.append(lora)
            # attn_norm, ffn_norm (+ Gemma's q_norm, k_norm, post_attention_norm, post_ffw_norm: None without them)
            self.norms.append(tuple(t(ir.tensors.get(f"blk.{i}.{n}")) for n in (
                "attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")))
            m = ir.prune_means.get(i)
            self.means.append(None if m is None else (t(m.o), t(m.down)))
            idx = ir.rope_index.get(i)
            self.rope_index.append(np.tile(np.arange(self.half), (KV, 1)) if idx is None else np.asarray(idx))
        # float32 inverse frequencies exactly as the reference runtime (and transformers) compute them,
        # per layer (Gemma's sliding layers have their own base)
        self.inv_freq = [rope_inv_freq(D, hp.layer_rope_theta(i)) for i in range(hp.num_layers)]
        self.attn_scale = float(hp.attention_scale)
        self._rope_cache: dict[tuple[int, int], tuple] = {}
        self._window_cache: dict[tuple[int, int], object] = {}

    # ---- parameters ----------------------------------------------------------------------------
    def parameters(self) -> list:
        return [p for layer in self.lora for role in ROLES for p in layer[role]]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- forward --------------------------------------------------------------------------------
    def _cos_sin(self, layer: int, T: int):
        """cos/sin (T, H, D) in the sorted rotate-half layout: slot j rotates at its own frequency."""
        key = (layer, T)
        if key not in self._rope_cache:
            torch = self.torch
            freqs = self.inv_freq[layer][self.rope_index[layer]]  # (KV, half)
            ang = np.arange(T).astype(np.float32)[:, None, None] * freqs[None]  # (T, KV, half)
            cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
            cos = np.repeat(np.concatenate([cos, cos], axis=-1), self.group, axis=1)  # (T, H, D)
            sin = np.repeat(np.concatenate([sin, sin], axis=-1), self.group, axis=1)
            self._rope_cache[key] = (torch.from_numpy(cos), torch.from_numpy(sin))
        return self._rope_cache[key]

    def _linear(self, x, layer: int, role: Role, use_lora: bool, rows: int | None = None, cols: int | None = None):
        """x @ W.T + b (+ frozen branches) (+ LoRA), restricted to output rows [:rows] / input cols [:cols]."""
        F = self.torch.nn.functional
        w, b, frozen = self.base[layer][role]
        ro = slice(None) if rows is None else slice(0, rows)
        ci = slice(None) if cols is None else slice(0, cols)
        y = F.linear(x, w[ro, ci], None if b is None else b[ro])
        for fa, fb, fs in frozen:
            y = y + F.linear(F.linear(x, fa[:, ci]) * fs, fb[ro])
        if use_lora:
            a, bb = self.lora[layer][role]
            y = y + F.linear(F.linear(x, a[:, ci]) * self.scale, bb[ro])
        return y

    def _rms(self, x, w):
        torch = self.torch
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.hp.rms_norm_eps) * w

    def _window_mask(self, window: int, T: int):
        """(T, T) boolean: key s is visible to query t when 0 <= t - s < window (a sliding layer)."""
        key = (window, T)
        if key not in self._window_cache:
            d = np.arange(T)[:, None] - np.arange(T)[None, :]
            self._window_cache[key] = self.torch.from_numpy((d >= 0) & (d < window))
        return self._window_cache[key]

    def _qk_mask(self, p: int):
        m = self.torch.zeros(self.hp.head_dim)
        m[:p] = 1.0
        m[self.half:self.half + p] = 1.0
        return m

    def _v_mask(self, nv: int):
        m = self.torch.zeros(self.hp.head_dim)
        m[:nv] = 1.0
        return m

    def hidden(self, ids, widths: Sequence[LayerWidths] | None = None, use_lora: bool = True,
               start: int = 0, x=None, collect: list | None = None):
        """Final-normed hidden states (B, T, hidden) for token ids (B, T) at the given widths.

        ``start`` / ``x``: begin at layer ``start`` with residual stream ``x`` (the input of that
        layer, e.g. from an earlier ``collect``); ``collect``: a list that receives every layer's
        input residual stream (for re-running the tail of the model cheaply)."""
        F = self.torch.nn.functional
        widths = _full_widths(self.ir) if widths is None else widths
        if x is None:
            x = F.embedding(ids, self.embd)
            if self.hp.embedding_scale != 1.0:  # (Gemma) in float32, as the reference runtime
                x = x * self.torch.tensor(self.hp.embedding_scale, dtype=self.torch.float32)
        for i in range(start, self.hp.num_layers):
            if collect is not None:
                collect.append(x)
            x = self.layer(x, i, widths[i], use_lora)
        return self._rms(x, self.out_norm)

    def layer(self, x, i: int, w: LayerWidths, use_lora: bool = True):
        """One decoder layer on the residual stream x (B, T, hidden)."""
        torch = self.torch
        F = torch.nn.functional
        hp = self.hp
        H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
        B, T = x.shape[0], x.shape[1]
        attn_norm, ffn_norm, q_norm, k_norm, post_attn_norm, post_ffw_norm = self.norms[i]
        h = self._rms(x, attn_norm)
        cos, sin = self._cos_sin(i, T)
        qk_mask = None if w.qk_pairs == self.half else self._qk_mask(w.qk_pairs)
        if qk_mask is not None and q_norm is not None:
            raise EdgeqError("QK-norm models keep every Q/K pair (their norm is over the whole head dim); "
                             f"layer {i} keeps {w.qk_pairs} of {self.half}")
        q = self._linear(h, i, Role.Q, use_lora).view(B, T, H, D)
        k = self._linear(h, i, Role.K, use_lora).view(B, T, KV, D)
        if qk_mask is not None:  # deployment keeps dims [0:p] ∪ [d/2 : d/2+p] of each head
            q, k = q * qk_mask, k * qk_mask
        if q_norm is not None:  # (Gemma) per-head RMSNorm before RoPE
            q, k = self._rms(q, q_norm), self._rms(k, k_norm)
        q = q * cos + torch.cat([-q[..., self.half:], q[..., :self.half]], dim=-1) * sin
        kc, ks = cos[:, ::self.group], sin[:, ::self.group]
        k = k * kc + torch.cat([-k[..., self.half:], k[..., :self.half]], dim=-1) * ks
        v = self._linear(h, i, Role.V, use_lora).view(B, T, KV, D)
        if w.v_dims < D:  # deployment keeps V/O components [0:v_dims] of each KV group
            v = v * self._v_mask(w.v_dims)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, .)
        if self.group > 1:
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
        scale = D ** -0.5 if hp.query_pre_attn_scalar is None else self.attn_scale
        if hp.is_sliding(i) and T > hp.sliding_window:  # (Gemma) keys within the window behind each query
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._window_mask(hp.sliding_window, T), scale=scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B, T, H * D)
        means = self.means[i]
        comp_o = None
        if means is not None and w.v_dims < D:  # bias compensation: the dropped V/O components' mean
            comp_o = self._compensation(means[0] * (1.0 - self._v_mask(w.v_dims).repeat(H)), i, Role.O, use_lora)
        x = self._residual(x, self._linear(o, i, Role.O, use_lora), comp_o, post_attn_norm)
        h = self._rms(x, ffn_norm)
        f = None if w.ffn == hp.intermediate_size else w.ffn  # MLP channels [0:ffn]
        g = self._linear(h, i, Role.GATE, use_lora, rows=f)
        g = F.silu(g) if hp.hidden_act == "silu" else F.gelu(g, approximate="tanh")
        a = g * self._linear(h, i, Role.UP, use_lora, rows=f)
        comp_d = None
        if means is not None and f is not None:  # ... and the dropped MLP channels' mean
            dropped = torch.zeros_like(means[1])
            dropped[f:] = means[1][f:]
            comp_d = self._compensation(dropped, i, Role.DOWN, use_lora)
        return self._residual(x, self._linear(a, i, Role.DOWN, use_lora, cols=f), comp_d, post_ffw_norm)

    def _residual(self, x, y, comp, post_norm):
        """x + y (+ the rate's bias compensation); with a sandwich norm (Gemma) x + norm(y + comp):
        the compensation enters the projection's output before the norm, as deployed."""
        if post_norm is None:
            x = x + y
            return x if comp is None else x + comp
        return x + self._rms(y if comp is None else y + comp, post_norm)

    def _compensation(self, mean_dropped, layer: int, role: Role, use_lora: bool):
        """W_eff @ mean_dropped (hidden,): what the deployed rate adds for the inputs it drops
        (``edgeq.passes.prune_bias.rate_bias``), through the adapted weights, without the bias."""
        F = self.torch.nn.functional
        w, _, frozen = self.base[layer][role]
        y = F.linear(mean_dropped, w)
        for fa, fb, fs in frozen:
            y = y + F.linear(F.linear(mean_dropped, fa) * fs, fb)
        if use_lora:
            a, bb = self.lora[layer][role]
            y = y + F.linear(F.linear(mean_dropped, a) * self.scale, bb)
        return y

    def logits(self, ids, widths: Sequence[LayerWidths] | None = None, use_lora: bool = True):
        return self.hidden(ids, widths, use_lora) @ self.out_w.T

    def loss(self, ids, widths: Sequence[LayerWidths] | None = None, use_lora: bool = True):
        """Mean next-token cross-entropy over every position of the (unpadded) batch."""
        F = self.torch.nn.functional
        logits = self.logits(ids[:, :-1], widths, use_lora)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def kl_loss(self, ids, widths: Sequence[LayerWidths] | None = None):
        """Mean over positions of KL(teacher ‖ student): the teacher is this model at full width
        without the adapter (no gradient), the student the adapted model at ``widths``."""
        torch = self.torch
        F = torch.nn.functional
        x = ids[:, :-1]
        with torch.no_grad():
            teacher = F.log_softmax(self.logits(x, None, use_lora=False), dim=-1)
        student = F.log_softmax(self.logits(x, widths, use_lora=True), dim=-1)
        V = teacher.shape[-1]
        return F.kl_div(student.reshape(-1, V), teacher.reshape(-1, V), reduction="batchmean", log_target=True)

    # ---- merge ----------------------------------------------------------------------------------
    def merged_ir(self, record: PassRecord | None = None) -> ModelIR:
        """A new ModelIR with W <- W + scale * B @ A on every linear (float32)."""
        linears = dict(self.ir.linears)
        with self.torch.no_grad():
            for i in range(self.hp.num_layers):
                for role in ROLES:
                    name = linear_name(i, role)
                    lin = linears[name]
                    a, b = (p.detach().double().numpy() for p in self.lora[i][role])
                    w = (lin.weight.astype(np.float64) + self.scale * (b @ a)).astype(np.float32)
                    linears[name] = dataclasses.replace(lin, weight=w)
        history = self.ir.history + ((record,) if record is not None else ())
        return self.ir.replace(linears=linears, history=history)


"""Recovery fine-tune: LoRA on a sorted, rate-configurable model, merged back into the weights.

METHOD.md step 3. Each step samples one of the model's pruning rates and trains LoRA adapters on
all seven linears of every layer through the model *as it is deployed at that rate*: MLP
channels ``[0:ffn]``, Q/K head dims ``[0:p] ∪ [d/2 : d/2+p]`` (p = kept RoPE pairs, each slot
rotated at its original frequency ``inv_freq[rope_index[g][j]]``), V/O components ``[0:v_dims]``
per KV group, attention scale ``head_dim ** -0.5``. Masking exactly the deployment slice (not a
contiguous tail, as UniQL does for Q/K) means the merged model is trained for what it runs.

The forward is a compact torch implementation of :mod:`runtimes.reference` (Llama / Qwen2),
float32, reading the frozen base weights straight from the IR arrays (no copies). After training
the adapters are merged (``W += scale * B @ A``) into a new ModelIR; ``rope_index`` and
``prune`` are unchanged, since every prefix stays a valid smaller model.

Two losses (``RecoverConfig.loss``, issue 15):

* ``"ce"``: next-token cross-entropy on the training text (the original recovery);
* ``"kl"``: distillation from the model as it came in — KL(teacher ‖ student) over the whole
  vocabulary at every position, the teacher being the same frozen weights at full width with no
  adapter (the unpruned model; for a sorted IR rate 0 is exactly it). One teacher forward
  (no gradient) per step. A sampled rate of 0 trains the adapter to stay the unpruned model, so
  rate 0 keeps its quality while the pruned rates learn the full model's distribution rather
  than the text's one-hot targets.

When the IR carries bias-compensation means (``--prune-bias``), the student forward adds each
rate's compensation exactly as deployment does: ``W_eff @ (mean * dropped)`` for ffn_down and
attn_output, through the adapted weights, so the vectors move with the training (the build
measures the means again after recovery).

CPU cost on SmolLM2-135M: see the comment on ``RecoverConfig.steps``.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm import tqdm

from edgeq.errors import EdgeqError, require
from edgeq.ir import LayerWidths, ModelIR, PassRecord, Role, full_widths, linear_name
from runtimes.reference import rope_inv_freq

ROLES = (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)
LOSSES = ("ce", "kl")


@dataclass(frozen=True)
class RecoverConfig:
    # Cost on SmolLM2-135M (batch 2 x 256 tokens, fp32, ~275 GFLOP per step at rate 0): ~7.7 s/step
    # on one uncontended Zen4 core, 9.5-12 s/step with threads=1 on 2 cores shared with other
    # jobs (load 5-10). threads=2 on those oversubscribed cores was 3-4x *slower* (32-65 s/step:
    # OpenMP threads spin-waiting for a core), hence threads=1 by default. 64 steps ~ 8-13 min;
    # pass time_budget_s to guarantee an upper bound on a busier machine.
    steps: int = 64
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    batch_size: int = 2
    seq_len: int = 256
    seed: int = 0
    threads: int = 1
    rates: tuple[float, ...] | None = None  # default: every rate the IR carries
    time_budget_s: float | None = None  # stop before a step would end past this many seconds
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 10% of lr
    max_grad_norm: float = 1.0
    loss: str = "ce"  # ce (next-token cross-entropy) | kl (distillation from the unpruned model's logits)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["rates"] = None if self.rates is None else [float(r) for r in self.rates]
        if self.loss == "ce":  # (records of the original recovery stay as they were)
            del d["loss"]
        return d


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
            self.norms.append((t(ir.tensors[f"blk.{i}.attn_norm"]), t(ir.tensors[f"blk.{i}.ffn_norm"])))
            m = ir.prune_means.get(i)
            self.means.append(None if m is None else (t(m.o), t(m.down)))
            idx = ir.rope_index.get(i)
            self.rope_index.append(np.tile(np.arange(self.half), (KV, 1)) if idx is None else np.asarray(idx))
        # float32 inverse frequencies exactly as the reference runtime (and transformers) compute them
        self.inv_freq = rope_inv_freq(D, hp.rope_theta)
        self._rope_cache: dict[tuple[int, int], tuple] = {}

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
            freqs = self.inv_freq[self.rope_index[layer]]  # (KV, half)
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
        attn_norm, ffn_norm = self.norms[i]
        h = self._rms(x, attn_norm)
        cos, sin = self._cos_sin(i, T)
        qk_mask = None if w.qk_pairs == self.half else self._qk_mask(w.qk_pairs)
        q = self._linear(h, i, Role.Q, use_lora).view(B, T, H, D)
        k = self._linear(h, i, Role.K, use_lora).view(B, T, KV, D)
        if qk_mask is not None:  # deployment keeps dims [0:p] ∪ [d/2 : d/2+p] of each head
            q, k = q * qk_mask, k * qk_mask
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
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5)  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B, T, H * D)
        x = x + self._linear(o, i, Role.O, use_lora)
        means = self.means[i]
        if means is not None and w.v_dims < D:  # bias compensation: the dropped V/O components' mean
            x = x + self._compensation(means[0] * (1.0 - self._v_mask(w.v_dims).repeat(H)), i, Role.O, use_lora)
        h = self._rms(x, ffn_norm)
        f = None if w.ffn == hp.intermediate_size else w.ffn  # MLP channels [0:ffn]
        a = F.silu(self._linear(h, i, Role.GATE, use_lora, rows=f)) * self._linear(h, i, Role.UP, use_lora, rows=f)
        x = x + self._linear(a, i, Role.DOWN, use_lora, cols=f)
        if means is not None and f is not None:  # ... and the dropped MLP channels' mean
            dropped = torch.zeros_like(means[1])
            dropped[f:] = means[1][f:]
            x = x + self._compensation(dropped, i, Role.DOWN, use_lora)
        return x

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


def _batches(sequences: Sequence[Sequence[int]], vocab: int, seq_len: int) -> list[np.ndarray]:
    seqs = []
    for s in sequences:
        a = np.asarray(s, dtype=np.int64)
        if a.size >= 2:
            seqs.append(a)
    if not seqs:
        raise EdgeqError("recover: no training sequence has at least 2 tokens")
    lo = min(int(s.min()) for s in seqs)
    hi = max(int(s.max()) for s in seqs)
    if lo < 0 or hi >= vocab:
        raise EdgeqError(f"recover: token id out of range [0, {vocab})")
    return seqs


def _make_batch(seqs: list[np.ndarray], rng: np.random.Generator, batch_size: int, seq_len: int) -> np.ndarray:
    """batch_size sequences drawn without replacement (when possible); a random window of at most
    seq_len tokens from each, all cropped to the shortest."""
    idx = rng.choice(len(seqs), size=batch_size, replace=len(seqs) < batch_size)
    chosen = [seqs[j] for j in idx]
    n = min(seq_len, min(s.size for s in chosen))
    rows = []
    for s in chosen:
        start = int(rng.integers(0, s.size - n + 1))
        rows.append(s[start:start + n])
    return np.stack(rows)


def _lr_at(step: int, cfg: RecoverConfig) -> float:
    warm = min(cfg.warmup_steps, max(cfg.steps // 10, 1))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(cfg.steps - warm, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def recover(ir: ModelIR, sequences: Sequence[Sequence[int]], config: RecoverConfig | None = None,
            progress: bool = True) -> ModelIR:
    """LoRA recovery fine-tune over the IR's pruning rates; returns the merged model."""
    cfg = config or RecoverConfig()
    torch = require("torch", "frontend")
    if cfg.steps < 0 or cfg.rank < 1 or cfg.batch_size < 1 or cfg.seq_len < 2:
        raise EdgeqError(f"recover: invalid config {cfg}")
    if cfg.loss not in LOSSES:
        raise EdgeqError(f"recover: unknown loss {cfg.loss!r} ({' or '.join(LOSSES)})")
    rates = tuple(cfg.rates) if cfg.rates is not None else ((0.0,) if ir.prune is None else tuple(ir.prune.rates))
    if not rates:
        raise EdgeqError("recover: no pruning rate to train at")
    widths = {r: widths_at(ir, r) for r in rates}  # refuses a rate the model does not carry
    seqs = _batches(sequences, ir.hparams.vocab_size, cfg.seq_len)

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    try:
        model = LoraModel(ir, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed)
        params = model.parameters()
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses: list[float] = []
        rate_losses: dict[float, list[float]] = {r: [] for r in rates}
        bar = None
        if progress:
            bar = tqdm(total=cfg.steps, desc=f"recover (LoRA, {cfg.loss})", unit="step", leave=False)
        step_s = 0.0
        stopped_early = False
        for step in range(cfg.steps):
            elapsed = time.perf_counter() - t0
            if cfg.time_budget_s is not None and step > 0 and elapsed + step_s > cfg.time_budget_s:
                stopped_early = True
                break
            ts = time.perf_counter()
            rate = rates[int(rng.integers(len(rates)))]
            ids = torch.from_numpy(_make_batch(seqs, rng, cfg.batch_size, cfg.seq_len))
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            loss = model.kl_loss(ids, widths[rate]) if cfg.loss == "kl" else model.loss(ids, widths[rate])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            lv = float(loss.detach())
            losses.append(lv)
            rate_losses[rate].append(lv)
            step_s = time.perf_counter() - ts
            if bar is not None:
                bar.set_postfix(loss=f"{lv:.3f}", rate=f"{rate:g}")
                bar.update(1)
        if bar is not None:
            bar.close()
        tail = losses[-max(1, len(losses) // 10):] if losses else []
        # (no timing in the record: it goes into the manifest, and a build must be byte-identical run to run)
        record = PassRecord("recover", {
            **cfg.to_json(),
            "rates": [float(r) for r in rates],
            "steps_done": len(losses),
            "stopped_early": stopped_early,
            "initial_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(tail)) if tail else None,  # mean over the last 10% of steps
            "final_loss_by_rate": {f"{r:g}": (float(np.mean(v[-max(1, len(v) // 5):])) if v else None)
                                   for r, v in rate_losses.items()},
            "trainable_params": model.num_trainable(),
        })
        return model.merged_ir(record)
    finally:
        torch.set_num_threads(prev_threads)


def eval_loss(ir: ModelIR, sequences: Sequence[Sequence[int]], rate: float = 0.0, threads: int | None = None) -> float:
    """Mean next-token cross-entropy of the IR at ``rate`` (torch forward, no LoRA), per sequence."""
    torch = require("torch", "frontend")
    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = LoraModel(ir, rank=1)
        w = widths_at(ir, rate)
        with torch.no_grad():
            vals = [float(model.loss(torch.from_numpy(np.asarray(s, dtype=np.int64)[None]), w, use_lora=False))
                    for s in sequences if len(s) >= 2]
        return float(np.mean(vals))
    finally:
        torch.set_num_threads(prev)

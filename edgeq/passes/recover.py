"""Recovery fine-tune: LoRA on a sorted, rate-configurable model, merged back into the weights.

METHOD.md step 3. Each step samples one of the model's pruning rates and trains LoRA adapters on
all seven linears of every layer through the model *as it is deployed at that rate*: MLP
channels ``[0:ffn]``, Q/K head dims ``[0:p] ∪ [d/2 : d/2+p]`` (p = kept RoPE pairs, each slot
rotated at its original frequency ``inv_freq[rope_index[g][j]]``), V/O components ``[0:v_dims]``
per KV group, attention scale of the original head dim. Masking exactly the deployment slice (not a
contiguous tail, as UniQL does for Q/K) means the merged model is trained for what it runs.

The forward is :class:`edgeq.passes.lora_model.LoraModel`, a compact torch implementation of
:mod:`runtimes.reference` (Llama / Qwen2 / Gemma 3), float32, reading the frozen base weights
straight from the IR arrays (no copies). After training
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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm import tqdm

from edgeq.errors import EdgeqError, require
from edgeq.ir import ModelIR, PassRecord
from edgeq.passes.lora_model import ROLES, LoraModel, widths_at

__all__ = ["LOSSES", "ROLES", "LoraModel", "RecoverConfig", "eval_loss", "recover", "widths_at"]

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

"""Reference runtime: executes a ModelIR directly with numpy (Llama / Qwen2), KV cache included.

The oracle for every other runtime: logits match ``transformers`` in fp32 (tests/runtimes).
Low-rank branches (LoRA kept separate, error compensation) are applied as extra small GEMMs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import Linear, ModelIR, Role
from runtimes.base import Session


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    # as transformers computes it, in float32
    return (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                         / np.float32(head_dim)))).astype(np.float32)


class _Layer:
    """A layer's weights pre-transposed for x @ W (row-major activations)."""

    def __init__(self, ir: ModelIR, i: int, dtype):
        self.lin = {r: self._prep(ir.linear(i, r), dtype) for r in Role}
        self.attn_norm = ir.tensors[f"blk.{i}.attn_norm"].astype(dtype)
        self.ffn_norm = ir.tensors[f"blk.{i}.ffn_norm"].astype(dtype)

    @staticmethod
    def _prep(lin: Linear, dtype):
        wt = np.ascontiguousarray(lin.weight.T, dtype=dtype)
        b = None if lin.bias is None else lin.bias.astype(dtype)
        lrs = [(np.ascontiguousarray(lr.a.T, dtype=dtype), np.ascontiguousarray(lr.b.T, dtype=dtype),
                dtype(lr.scale)) for lr in lin.low_rank]
        return wt, b, lrs

    def apply(self, role: Role, x: np.ndarray) -> np.ndarray:
        wt, b, lrs = self.lin[role]
        y = x @ wt
        if b is not None:
            y = y + b
        for at, bt, s in lrs:
            y = y + ((x @ at) @ bt) * s
        return y


class ReferenceSession(Session):
    name = "reference"

    def __init__(self, ir: ModelIR, n_ctx: int = 2048, dtype=np.float32):
        ir.validate()
        self.ir = ir
        self.hp = hp = ir.hparams
        self.dtype = dtype
        self.n_ctx = n_ctx
        self.embd = ir.tensors["token_embd"].astype(dtype)
        self.out_t = np.ascontiguousarray(ir.output_weight().T, dtype=dtype)
        self.out_norm = ir.tensors["output_norm"].astype(dtype)
        self.layers = [_Layer(ir, i, dtype) for i in range(hp.num_layers)]
        self.inv_freq = rope_inv_freq(hp.head_dim, hp.rope_theta)
        self._tok = None
        self._k = np.zeros((hp.num_layers, n_ctx, hp.num_kv_heads, hp.head_dim), dtype=dtype)
        self._v = np.zeros_like(self._k)
        self._pos = 0

    # ---- text --------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tok is None:
            from runtimes.text import SpecTokenizer

            if self.ir.tokenizer is None:
                raise EdgeqError("model has no tokenizer")
            self._tok = SpecTokenizer(self.ir.tokenizer)
        return self._tok

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def eos_ids(self) -> frozenset[int]:  # type: ignore[override]
        return self.tokenizer.eos_ids if self.ir.tokenizer is not None else frozenset()

    def apply_chat_template(self, prompt: str) -> str:
        return self.tokenizer.chat(prompt)

    # ---- compute -----------------------------------------------------------------------------
    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        # x: (T, H, D), rotate-half convention
        freqs = pos.astype(np.float32)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb).astype(self.dtype)[:, None, :], np.sin(emb).astype(self.dtype)[:, None, :]
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rot * sin

    def _forward(self, ids: Sequence[int], start: int) -> np.ndarray:
        hp = self.hp
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            raise EdgeqError("empty token sequence")
        if ids.min() < 0 or ids.max() >= hp.vocab_size:
            raise EdgeqError(f"token id out of range [0, {hp.vocab_size})")
        T = ids.size
        if start + T > self.n_ctx:
            raise EdgeqError(f"context of {start + T} tokens exceeds n_ctx={self.n_ctx}")
        pos = np.arange(start, start + T)
        x = self.embd[ids]
        H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
        group = H // KV
        scale = self.dtype(1.0 / np.sqrt(D))
        end = start + T
        mask = np.triu(np.full((T, end), -np.inf, dtype=self.dtype), k=start + 1)
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L.attn_norm, hp.rms_norm_eps)
            q = self._rope(L.apply(Role.Q, h).reshape(T, H, D), pos)
            k = self._rope(L.apply(Role.K, h).reshape(T, KV, D), pos)
            v = L.apply(Role.V, h).reshape(T, KV, D)
            self._k[li, start:end] = k
            self._v[li, start:end] = v
            K = self._k[li, :end]  # (end, KV, D)
            V = self._v[li, :end]
            qg = q.reshape(T, KV, group, D).transpose(1, 2, 0, 3)  # (KV, g, T, D)
            att = np.einsum("kgtd,skd->kgts", qg, K) * scale + mask
            att = att - att.max(axis=-1, keepdims=True)
            np.exp(att, out=att)
            att /= att.sum(axis=-1, keepdims=True)
            o = np.einsum("kgts,skd->tkgd", att, V).reshape(T, H * D)
            x = x + L.apply(Role.O, o)
            h = rms_norm(x, L.ffn_norm, hp.rms_norm_eps)
            x = x + L.apply(Role.DOWN, silu(L.apply(Role.GATE, h)) * L.apply(Role.UP, h))
        x = rms_norm(x, self.out_norm, hp.rms_norm_eps)
        return x

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        x = self._forward(token_ids, 0)
        self._pos = len(token_ids)
        return (x @ self.out_t).astype(np.float32)

    def _start(self, prompt_ids: Sequence[int]) -> np.ndarray:
        x = self._forward(prompt_ids, 0)
        self._pos = len(prompt_ids)
        return (x[-1] @ self.out_t).astype(np.float32)

    def _step(self, token_id: int) -> np.ndarray:
        x = self._forward([token_id], self._pos)
        self._pos += 1
        return (x[-1] @ self.out_t).astype(np.float32)

    @classmethod
    def from_path(cls, path: str | Path, **kw) -> "ReferenceSession":
        from edgeq.frontend import load_model

        return cls(load_model(path), **kw)

"""Naive sort: the weight-norm baseline for the UniQL sort (benchmarks only).

A permutation-only reparametrisation, no calibration data and no SVD: every prunable dimension
is ordered by a plain weight-magnitude score, descending (ties keep the original order), so the
model is exactly the same function at rate 0 and a rate keeps the "largest-weight" prefix.

Scores (base weights only; low-rank branches and biases are permuted along but not scored):

* MLP channel i: ``||W_gate[i, :]|| * ||W_up[i, :]|| * ||W_down[:, i]||`` — the product of the
  L2 norms of the three weight vectors that touch the channel (the channel's output is
  ``down[:, i] * silu(gate_i . x) * (up_i . x)``, so a product, not the norm of the concatenation,
  is the scale-consistent magnitude).
* Q/K RoPE pair j of KV group g (dims j and j + d/2 stay together):
  ``||Q_rows(j)|| * ||K_rows(j)||`` where ``Q_rows(j)`` are rows j and j + d/2 of every query head
  of the group and ``K_rows(j)`` rows j and j + d/2 of K head g (Frobenius norms). All heads of the
  group and the shared K head get the same order; ``ir.rope_index`` records, per layer and group,
  the original pair (frequency) of each slot, composed with any existing index.
* V/O component c of KV group g: ``||W_V[g*d + c, :]|| * ||W_O[:, {h*d + c : h in group}]||``;
  V rows (and bias) and the O columns of every query head of the group are permuted together.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import Linear, ModelIR, PassRecord, Role
from edgeq.passes.prune_bias import means_moved


@dataclass(frozen=True)
class NaiveSortConfig:
    """No options: the baseline is fully determined by the weights."""


def _order(score: np.ndarray) -> np.ndarray:
    """Indices sorting ``score`` descending; ties keep the original order (deterministic)."""
    return np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")


def _permute_out(lin: Linear, rows: np.ndarray) -> Linear:
    """New output row r is old row ``rows[r]`` (weight, bias, every low-rank B)."""
    return dataclasses.replace(
        lin, weight=np.ascontiguousarray(lin.weight[rows]),
        bias=None if lin.bias is None else np.ascontiguousarray(lin.bias[rows]),
        low_rank=tuple(dataclasses.replace(lr, b=np.ascontiguousarray(lr.b[rows])) for lr in lin.low_rank))


def _permute_in(lin: Linear, cols: np.ndarray) -> Linear:
    """New input column c is old column ``cols[c]`` (weight, every low-rank A)."""
    return dataclasses.replace(
        lin, weight=np.ascontiguousarray(lin.weight[:, cols]),
        low_rank=tuple(dataclasses.replace(lr, a=np.ascontiguousarray(lr.a[:, cols])) for lr in lin.low_rank))


def _norm(a: np.ndarray, axis=None) -> np.ndarray:
    a = a.astype(np.float64)
    return np.sqrt(np.sum(a * a, axis=axis))


def naive_sort(ir: ModelIR, config: NaiveSortConfig = NaiveSortConfig(), stats: object = None) -> ModelIR:
    """Sort every prunable dimension of ``ir`` by weight norms (see the module docstring).

    ``stats`` is accepted for the pass-registry signature and ignored (no calibration needed).
    """
    if not isinstance(config, NaiveSortConfig):
        raise EdgeqError(f"expected a NaiveSortConfig, got {type(config).__name__}")
    ir.validate()
    hp = ir.hparams
    H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
    if D % 2:
        raise EdgeqError(f"head_dim must be even for RoPE pairs, got {D}")
    half, group = D // 2, H // KV
    linears = dict(ir.linears)
    rope_index = dict(ir.rope_index)
    means = dict(ir.prune_means)
    for i in range(hp.num_layers):
        lin = {r: ir.linear(i, r) for r in Role}

        # MLP channels
        perm = _order(_norm(lin[Role.GATE].weight, 1) * _norm(lin[Role.UP].weight, 1)
                      * _norm(lin[Role.DOWN].weight, 0))
        linears[lin[Role.GATE].name] = _permute_out(lin[Role.GATE], perm)
        linears[lin[Role.UP].name] = _permute_out(lin[Role.UP], perm)
        linears[lin[Role.DOWN].name] = _permute_in(lin[Role.DOWN], perm)

        # Q/K RoPE pairs and V/O components, per KV group
        wq = lin[Role.Q].weight.reshape(H, 2, half, -1)  # (head, half, pair, hidden)
        wk = lin[Role.K].weight.reshape(KV, 2, half, -1)
        wv = lin[Role.V].weight.reshape(KV, D, -1)
        wo = lin[Role.O].weight.reshape(-1, H, D)  # (hidden, head, component)
        q_rows = np.arange(H * D).reshape(H, 2, half)
        k_rows = np.arange(KV * D).reshape(KV, 2, half)
        v_rows = np.arange(KV * D).reshape(KV, D)
        o_cols = np.arange(H * D).reshape(H, D)
        old_idx = rope_index.get(i)
        new_idx = np.empty((KV, half), dtype=np.int64)
        for g in range(KV):
            heads = slice(g * group, (g + 1) * group)
            qs = _norm(wq[heads].transpose(2, 0, 1, 3).reshape(half, -1), 1)
            ks = _norm(wk[g].transpose(1, 0, 2).reshape(half, -1), 1)
            # slot s <- current pair p[s]; QK-norm models keep their pair order (Q/K pairs are not
            # pruned under QK-norm: edgeq.passes.sort_qk)
            p = np.arange(half) if hp.qk_norm else _order(qs * ks)
            q_rows[heads] = q_rows[heads][:, :, p]
            k_rows[g] = k_rows[g][:, p]
            new_idx[g] = p if old_idx is None else np.asarray(old_idx[g])[p]

            vs = _norm(wv[g], 1) * _norm(wo[:, heads, :].transpose(2, 0, 1).reshape(D, -1), 1)
            c = _order(vs)
            v_rows[g] = v_rows[g][c]
            o_cols[heads] = o_cols[heads][:, c]
        linears[lin[Role.Q].name] = _permute_out(lin[Role.Q], q_rows.reshape(-1))
        linears[lin[Role.K].name] = _permute_out(lin[Role.K], k_rows.reshape(-1))
        linears[lin[Role.V].name] = _permute_out(lin[Role.V], v_rows.reshape(-1))
        linears[lin[Role.O].name] = _permute_in(lin[Role.O], o_cols.reshape(-1))
        if not hp.qk_norm:
            rope_index[i] = new_idx
        if means:  # bias compensation's mean inputs follow the MLP channels and O columns
            means = means_moved(ir.replace(prune_means=means), i, down=lambda m, perm=perm: m[perm],
                                o=lambda m, cols=o_cols.reshape(-1): m[cols])
    out = ir.replace(linears=linears, rope_index=rope_index, prune_means=means,
                     history=ir.history + (PassRecord("naive_sort", dataclasses.asdict(config)),))
    out.validate()
    return out


__all__ = ["NaiveSortConfig", "naive_sort"]

"""Sort Q/K head dims by RoPE pair (UniQL), per KV group; an exact reparametrisation.

For KV group g with query heads h in g: ``s_j = sqrt(sum_h C_Q[h, j] * C_K[g, j])`` from the
(pre-RoPE, see edgeq.calibrate) diagonals ``q_diag`` / ``k_diag``; pair j = (j, j + d/2) scores
``s_j + s_{j+d/2}``. Pairs are sorted descending and the head layout becomes
``[sorted pairs' first halves, sorted pairs' second halves]`` -- the same order for every query
head of the group and for the group's K head (rows of W_q / W_k, their biases and low-rank
``B``), so q.k is unchanged once RoPE uses each slot's original frequency:
``ir.rope_index[layer][g, slot]`` = the original pair index of the slot (composed with any
rope_index already present). Keeping a prefix of p pairs keeps dims ``[0:p] + [d/2 : d/2+p]``.

:func:`restore_rope_order` is the inverse (for lowerings whose RoPE uses the sequential pair
frequencies: GGUF, the ONNX GQA operator).

A model with QK-norm (Gemma 3) is left as it is (the record says ``exempt``): its Q/K pairs are
not pruned — the norm is over the whole head dim, so a kept prefix of pairs would be normalised
by a different mean square than in the full model — and a sort that is never cut buys nothing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import HParams, ModelIR, PassRecord, Role, linear_name
from edgeq.passes import map_out, record, register, require_stats
from edgeq.passes.sort_mlp import sort_order

PASS_NAME = "sort_qk"


@dataclass(frozen=True)
class SortQKConfig:
    pass


def qk_pair_scores(q_diag: np.ndarray, k_diag: np.ndarray) -> np.ndarray:
    """(num_kv_heads, head_dim/2) pair scores from q_diag (H, D) and k_diag (KV, D)."""
    H, D = q_diag.shape
    KV = k_diag.shape[0]
    q_group = np.asarray(q_diag, dtype=np.float64).reshape(KV, H // KV, D).sum(axis=1)  # sum over heads of the group
    s = np.sqrt(np.clip(q_group * np.asarray(k_diag, dtype=np.float64), 0.0, None))
    return s[:, : D // 2] + s[:, D // 2:]


def head_perm(order: np.ndarray) -> np.ndarray:
    """Head-dim permutation for a pair order: [order, order + d/2]."""
    return np.concatenate([order, order + order.size])


@register(SortQKConfig)
def sort_qk(ir: ModelIR, config: SortQKConfig, stats) -> ModelIR:
    stats = require_stats(ir, stats, PASS_NAME)
    hp = ir.hparams
    if hp.qk_norm:  # Q/K pairs are exempt from pruning (module doc)
        return dataclasses.replace(ir, history=ir.history + (record(ir, PASS_NAME, config, stats, layers_permuted=0,
                                                                    exempt="qk_norm"),))
    H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
    half, G = D // 2, H // KV
    linears = dict(ir.linears)
    rope_index = dict(ir.rope_index)
    moved = 0
    for i in range(hp.num_layers):
        scores = qk_pair_scores(stats.layers[i].q_diag, stats.layers[i].k_diag)
        orders = np.stack([sort_order(scores[g]) for g in range(KV)])  # (KV, half)
        old = rope_index.get(i, np.tile(np.arange(half), (KV, 1)))
        new = np.take_along_axis(np.asarray(old), orders, axis=1)
        moved += int(np.any(orders != np.arange(half)))
        if np.array_equal(new, np.tile(np.arange(half), (KV, 1))):
            rope_index.pop(i, None)
        else:
            rope_index[i] = new.astype(np.int64)
        q_rows = np.concatenate([h * D + head_perm(orders[h // G]) for h in range(H)])
        k_rows = np.concatenate([g * D + head_perm(orders[g]) for g in range(KV)])
        for role, rows in ((Role.Q, q_rows), (Role.K, k_rows)):
            n = linear_name(i, role)
            linears[n] = map_out(linears[n], lambda a, rows=rows: a[rows])
    return dataclasses.replace(ir, linears=linears, rope_index=rope_index,
                               history=ir.history + (record(ir, PASS_NAME, config, stats, layers_permuted=moved),))


def qk_restore_rows(hp: HParams, idx: np.ndarray, role: Role) -> np.ndarray:
    """Row gather that puts the rows of a pair-sorted Q or K weight back in the original order:
    restored row ``h*D + o`` (and ``h*D + D/2 + o``) = sorted row of the slot holding pair ``o``."""
    D, half = hp.head_dim, hp.head_dim // 2
    group = hp.num_heads // hp.num_kv_heads
    inv = np.argsort(np.asarray(idx), axis=1, kind="stable")  # (KV, half): original pair -> slot
    n_head = hp.num_heads if role == Role.Q else hp.num_kv_heads
    rows = []
    for h in range(n_head):
        g = h // group if role == Role.Q else h
        rows.append(h * D + inv[g])
        rows.append(h * D + half + inv[g])
    return np.concatenate(rows)


def restore_rope_order(ir: ModelIR) -> ModelIR:
    """Undo the Q/K RoPE-pair sort: Q and K rows (weights, biases, low-rank ``B``) go back to
    the original pair order of every KV group (the same order for every query head of the
    group and for the shared K head), and ``rope_index`` is cleared. An exact reparametrisation
    (a row permutation); a model without ``rope_index`` comes back as it is."""
    idx_by_layer = {int(k): np.asarray(v) for k, v in ir.rope_index.items()}
    if not idx_by_layer:
        return ir
    hp = ir.hparams
    half = hp.head_dim // 2
    lins = dict(ir.linears)
    for layer, idx in sorted(idx_by_layer.items()):
        if idx.shape != (hp.num_kv_heads, half):
            raise EdgeqError(f"rope_index[{layer}]: expected shape {(hp.num_kv_heads, half)}, got {idx.shape}")
        if np.array_equal(idx, np.tile(np.arange(half), (hp.num_kv_heads, 1))):
            continue
        for role in (Role.Q, Role.K):
            lin = ir.linear(layer, role)
            rows = qk_restore_rows(hp, idx, role)
            lins[lin.name] = dataclasses.replace(
                lin, weight=np.ascontiguousarray(lin.weight[rows]),
                bias=None if lin.bias is None else np.ascontiguousarray(lin.bias[rows]),
                low_rank=tuple(dataclasses.replace(lr, b=np.ascontiguousarray(lr.b[rows])) for lr in lin.low_rank))
    return ir.replace(linears=lins, rope_index={},
                      history=tuple(ir.history) + (PassRecord("restore_rope_order"),))

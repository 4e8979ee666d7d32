"""V/O: whitened SVD per KV group (UniQL), an exact orthogonal change of basis of each V head.

For KV group g with V rows W_g (head_dim x hidden) and C = mean X^T X of the attention input
(``LayerStats.attn_xx``): the SVD ``C^{1/2} W_g^T = U S V^T`` gives ``W_g^T = C^{-1/2} U S V^T``.
With ``R = V^T`` (orthogonal, head_dim x head_dim):

* ``W_g' = R W_g = S U^T C^{-1/2}`` -- components sorted by singular value, all singular values
  in V ("quantization-aware": W_O keeps orthonormal rows); V bias ``b_g' = R b_g``; low-rank
  ``B`` rows of the group ``R B_g``.
* every query head h of the group: ``W_O[:, h] ' = W_O[:, h] R^T`` (low-rank ``A`` columns alike).

Since ``R^T R = I`` this is exact; a prefix of k components is the activation-whitened rank-k
truncation of the V head. W_g' is computed as ``R @ W_g`` from the original weights, so
exactness does not depend on how well C is conditioned. If the linear carries low-rank
branches the SVD is of the effective weight ``W + scale * B A`` and the same R is applied to
base and branches.

damp: C^{1/2} is taken from the eigendecomposition of C with eigenvalues ``max(ev, 0) +
damp * mean(diag C)``; it only matters where C is (near) singular, e.g. with fewer calibration
tokens than the hidden size, where directions the data never visits are then ranked by the
plain weight norm instead of arbitrarily.

fold_v_bias (default True): attention rows sum to 1, so the V bias adds the constant
``sum_h W_O[:, h] b_{g(h)}`` to the attention output whatever the attention weights are. It is
folded into the o_proj bias (created if absent) and V loses its bias: exact at rate 0, and at a
pruning rate the whole bias survives instead of the kept components of ``R b`` only. (A backend
that cannot take a bias on attn_output needs ``fold_v_bias=False``.)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import ModelIR, Role, linear_name
from edgeq.passes import effective_weight, map_in, map_out, record, register, require_stats
from edgeq.passes.prune_bias import means_moved
from edgeq.streaming import layer_workers, ordered_map

PASS_NAME = "svd_vo"


@dataclass(frozen=True)
class SVDVOConfig:
    damp: float = 1e-6  # relative to mean(diag C)
    fold_v_bias: bool = True


def sqrt_psd(C: np.ndarray, damp: float) -> np.ndarray:
    """Damped symmetric square root of a PSD matrix (float64)."""
    C = np.asarray(C, dtype=np.float64)
    ev, Q = np.linalg.eigh((C + C.T) / 2)
    ev = np.clip(ev, 0.0, None) + damp * max(float(np.mean(np.diag(C))), 0.0)
    return (Q * np.sqrt(ev)) @ Q.T


def vo_rotation(C_half: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, singular values) for one V head ``w`` (head_dim x hidden), given ``C^{1/2}``.

    R rows are the right singular vectors of ``C^{1/2} w^T`` by descending singular value, each
    signed so that its largest-magnitude entry is positive (deterministic)."""
    _, s, vt = np.linalg.svd(C_half @ np.asarray(w, dtype=np.float64).T, full_matrices=False)
    idx = np.argmax(np.abs(vt), axis=1)
    sign = np.where(vt[np.arange(vt.shape[0]), idx] < 0, -1.0, 1.0)
    return vt * sign[:, None], s


@register(SVDVOConfig)
def svd_vo(ir: ModelIR, config: SVDVOConfig, stats) -> ModelIR:
    stats = require_stats(ir, stats, PASS_NAME)
    if config.damp < 0:
        raise EdgeqError(f"{PASS_NAME}: damp must be >= 0, got {config.damp}")
    hp = ir.hparams
    H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
    G = H // KV
    linears = dict(ir.linears)
    means = dict(ir.prune_means)
    def layer_rotations(i):  # a hidden x hidden eigendecomposition + KV SVDs, one layer per worker thread
        C_half = sqrt_psd(stats.layers[i].attn_xx, config.damp)
        w_eff = effective_weight(ir.linears[linear_name(i, Role.V)])
        return [vo_rotation(C_half, w_eff[g * D:(g + 1) * D])[0] for g in range(KV)]

    for i, Rs in enumerate(ordered_map(layer_rotations, range(hp.num_layers), workers=layer_workers())):
        v_name, o_name = linear_name(i, Role.V), linear_name(i, Role.O)
        v, o = linears[v_name], linears[o_name]

        def rot_rows(a, Rs=Rs):  # V output rows, block g -> R_g @ block g
            return np.concatenate([Rs[g] @ a[g * D:(g + 1) * D] for g in range(KV)], axis=0)

        def rot_cols(a, Rs=Rs):  # O input columns, head h -> block h @ R_{g(h)}^T
            return np.concatenate([a[:, h * D:(h + 1) * D] @ Rs[h // G].T for h in range(H)], axis=1)

        b_v_folded = None
        if config.fold_v_bias and v.bias is not None:
            b_v = b_v_folded = v.bias.astype(np.float64)
            w_o = effective_weight(o)
            const = sum(w_o[:, h * D:(h + 1) * D] @ b_v[(h // G) * D:(h // G + 1) * D] for h in range(H))
            b_o = const if o.bias is None else o.bias.astype(np.float64) + const
            o = dataclasses.replace(o, bias=b_o.astype(np.float32))
            v = dataclasses.replace(v, bias=None)
        linears[v_name] = map_out(v, rot_rows)
        linears[o_name] = map_in(o, rot_cols)
        if means:  # o_proj's mean input, head h: R_g(h) @ its old block (what W_O R^T now reads), less
            # the V bias folded out of it (attention rows sum to 1: it was a constant of every head)
            def o_mean(m, Rs=Rs, b=b_v_folded):
                return np.concatenate([Rs[h // G] @ (m[h * D:(h + 1) * D] - (0 if b is None else b[(h // G) * D:(h // G + 1) * D]))
                                       for h in range(H)])
            means = means_moved(ir.replace(prune_means=means), i, o=o_mean)
    return dataclasses.replace(ir, linears=linears, prune_means=means, history=ir.history + (record(ir, PASS_NAME, config, stats),))

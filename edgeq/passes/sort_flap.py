"""FLAP's fluctuation metric as a sort (An et al., AAAI 2024, "Fluctuation-based Adaptive
Structured Pruning"): the baseline beside UniQL's sorts (issue 15). An exact reparametrisation.

Metric ("WIFV", weighted input feature variance): input channel ``j`` of an output projection
``W`` (out x in) scores

    s_j = Var_tokens(x_j) * ||W[:, j]||^2

with ``Var = E[x_j^2] - E[x_j]^2`` from the calibration statistics (the diagonal of ``mlp_zz`` /
``o_xx`` and ``z_mean`` / ``o_mean``: the population variance; FLAP's sample variance differs by
the constant ``N / (N - 1)``, which neither a ranking nor the standardisation of the allocation
sees) and ``W`` the effective weight (low-rank branches included). With bias compensation
(``--prune-bias``: a dropped input is replaced by its mean) dropping channel ``j`` alone adds
exactly ``E|W[:, j] (x_j - E x_j)|^2 = s_j`` to the projection's mean squared output error: the
metric is that error with the cross terms between channels ignored.

Per dimension (each sorted descending by score, ties keep the original order):

* MLP channel ``j``: ``x = z`` (ffn_down's input), ``W = W_down``; gate/up rows (biases, low-rank
  ``B``) and down columns (low-rank ``A``) permuted, the bias compensation's means with them.
* V/O component ``c`` of KV group ``g``: V row ``g*D + c`` feeds attn_output's column ``h*D + c``
  of every query head ``h`` of the group, and edgeq keeps one prefix of components per group (not
  FLAP's whole heads), so the component scores ``sum_{h in g} Var(o_{h,c}) ||W_O[:, h*D + c]||^2``.
  V rows (bias, ``B``) and the O columns of the group's heads (``A``) are permuted together — a
  permutation, not UniQL's whitened SVD rotation (``edgeq.passes.svd_vo``).
* Q/K RoPE pairs: UniQL's score (``edgeq.passes.sort_qk``, the same statistics). They feed a
  softmax, not an output projection, so FLAP's metric has no weight to measure them by (FLAP
  prunes whole heads, scored by their o_proj columns).

:func:`mlp_fluctuation` / :func:`vo_fluctuation` are the scores in the IR's current order (the
statistics must have been collected on that order). The pass returns the sorted model;
:func:`sorted_mlp_scores` gives each layer's MLP scores in the new (descending) order, which
FLAP's adaptive allocation across layers (``--importance fluctuation``,
``edgeq.passes.prune_alloc.fluctuation_curves``) reads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import ModelIR, Role, linear_name
from edgeq.passes import effective_weight, map_in, map_out, record, register, require_stats, run_pass
from edgeq.passes.prune_bias import means_moved
from edgeq.passes.sort_mlp import sort_order
from edgeq.passes.sort_qk import SortQKConfig

PASS_NAME = "sort_flap"


@dataclass(frozen=True)
class FlapSortConfig:
    """No options: the metric is fully determined by the statistics and the weights."""


def _variance(second: np.ndarray, mean: np.ndarray | None, what: str) -> np.ndarray:
    if mean is None:
        raise EdgeqError(f"{PASS_NAME}: the calibration statistics lack the mean input of {what} "
                         "(collected by an older edgeq); recalibrate")
    return np.clip(np.asarray(second, dtype=np.float64) - np.square(np.asarray(mean, dtype=np.float64)), 0.0, None)


def mlp_fluctuation(ir: ModelIR, stats, layer: int) -> np.ndarray:
    """(d_ff,) float64: ``Var(z_j) * ||W_down[:, j]||^2`` per MLP channel, in the IR's current order."""
    L = stats.layers[layer]
    var = _variance(np.diag(L.mlp_zz), L.z_mean, "ffn_down")
    w = effective_weight(ir.linear(layer, Role.DOWN))
    return var * np.einsum("ij,ij->j", w, w)


def vo_fluctuation(ir: ModelIR, stats, layer: int) -> np.ndarray:
    """(num_kv_heads, head_dim) float64: per KV group and V/O component, the sum over the group's
    query heads of ``Var(o_{h,c}) * ||W_O[:, h*D + c]||^2`` (IR column order)."""
    hp = ir.hparams
    H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
    L = stats.layers[layer]
    if L.o_xx is None:
        raise EdgeqError(f"{PASS_NAME}: the calibration statistics lack the o_proj input covariance "
                         "(collected by an older edgeq); recalibrate")
    var = _variance(np.diag(L.o_xx), L.o_mean, "attn_output")
    w = effective_weight(ir.linear(layer, Role.O))
    per_col = (var * np.einsum("ij,ij->j", w, w)).reshape(H, D)
    return per_col.reshape(KV, H // KV, D).sum(axis=1)


def sorted_mlp_scores(ir: ModelIR, stats) -> list[np.ndarray]:
    """Per layer, the MLP channels' fluctuation scores in the order :func:`sort_flap` leaves them
    (descending), from the statistics of ``ir`` as it was before the sort."""
    return [np.sort(mlp_fluctuation(ir, stats, i))[::-1].copy() for i in range(ir.hparams.num_layers)]


@register(FlapSortConfig)
def sort_flap(ir: ModelIR, config: FlapSortConfig, stats) -> ModelIR:
    stats = require_stats(ir, stats, PASS_NAME)
    hp = ir.hparams
    H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
    G = H // KV
    linears = dict(ir.linears)
    means = dict(ir.prune_means)
    moved = 0
    for i in range(hp.num_layers):
        perm = sort_order(mlp_fluctuation(ir, stats, i))
        vo = vo_fluctuation(ir, stats, i)
        comp = np.stack([sort_order(vo[g]) for g in range(KV)])  # (KV, D): slot -> old component
        moved += int(np.any(perm != np.arange(perm.size)) or np.any(comp != np.arange(D)))
        for role in (Role.GATE, Role.UP):
            n = linear_name(i, role)
            linears[n] = map_out(linears[n], lambda a, perm=perm: a[perm])
        n = linear_name(i, Role.DOWN)
        linears[n] = map_in(linears[n], lambda a, perm=perm: a[:, perm])
        v_rows = np.concatenate([g * D + comp[g] for g in range(KV)])
        o_cols = np.concatenate([h * D + comp[h // G] for h in range(H)])
        n = linear_name(i, Role.V)
        linears[n] = map_out(linears[n], lambda a, rows=v_rows: a[rows])
        n = linear_name(i, Role.O)
        linears[n] = map_in(linears[n], lambda a, cols=o_cols: a[:, cols])
        if means:  # bias compensation's mean inputs follow the MLP channels and O columns
            means = means_moved(ir.replace(prune_means=means), i, down=lambda m, perm=perm: m[perm],
                                o=lambda m, cols=o_cols: m[cols])
    out = dataclasses.replace(ir, linears=linears, prune_means=means,
                              history=ir.history + (record(ir, PASS_NAME, config, stats, layers_permuted=moved),))
    return run_pass(out, SortQKConfig(), stats)  # Q/K pairs: UniQL's score (rows of Q/K only, disjoint)


__all__ = ["FlapSortConfig", "mlp_fluctuation", "sort_flap", "sorted_mlp_scores", "vo_fluctuation"]

"""Bias compensation of structured pruning (FLAP's, per rate): put back the pruned inputs' mean.

A rate keeps a prefix of ffn_down's inputs (MLP channels) and of attn_output's inputs (the V/O
components of every head). The inputs it drops are not zero on average: channel ``i`` of
ffn_down's input has mean ``E[z_i]`` over calibration tokens. Replacing each dropped input by
its mean instead of zero adds a constant to the linear's output:

    b_down(r) = W_down[:, f_r:] @ E[z[f_r:]]                        (hidden,)
    b_o(r)    = sum_h W_O[:, h*D + v_r : (h+1)*D] @ E[o_h[v_r:]]     (hidden,)

with ``f_r`` / ``v_r`` the layer's kept widths at rate ``r`` (``LayerWidths.ffn`` / ``v_dims``)
and ``W`` the effective weight (low-rank branches included, float64). Q/K pairs feed a softmax,
not a linear output, and get no compensation. Rate 0 drops nothing: both vectors are zero.

Per rate a layer gains two vectors of ``hidden`` floats: negligible beside its weights, and a
rate switch selects them without copying anything. The means (``ModelIR.prune_means``,
:class:`~edgeq.ir.LayerMeans`) are measured on the model as it will run, at rate 0, in the IR's
current column order (``edgeq.calibrate.collect_means``), so they follow whatever sort or
recovery ran before; :func:`with_prune_means` attaches them.

Where the means come from: with ``--prune-bias`` the build attaches the calibration's means
(``LayerStats.z_mean`` / ``o_mean``, collected with the sort statistics, no extra forward) to the
IR before the sorts, and every sort carries them into its new column order: a permutation of
the MLP channels permutes ``down`` (:func:`means_moved`), the V/O rotation ``R`` of each KV group
(``edgeq.passes.svd_vo``) maps each head's ``o`` block to ``R o`` (what its O columns
``W_O R^T`` now read), the naive sort's V/O permutation permutes it. A recovery fine-tune
changes the function, so the means are then measured again on the recovered model
(``edgeq.calibrate.collect_means``).

The reference runtime computes the same vectors from its own weight layout
(``runtimes.reference.layer_rate_bias``); the lowerings use :func:`rate_bias_tables`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import LayerMeans, LayerWidths, ModelIR, PassRecord, Role

PASS_NAME = "prune_bias"


def _cols(lin, lo_hi: Sequence[tuple[int, int]]) -> np.ndarray:
    """The effective weight's columns in the ranges ``lo_hi`` (float64, (out, n))."""
    w = np.concatenate([np.asarray(lin.weight[:, a:b], dtype=np.float64) for a, b in lo_hi], axis=1)
    for lr in lin.low_rank:
        a = np.concatenate([np.asarray(lr.a[:, x:y], dtype=np.float64) for x, y in lo_hi], axis=1)
        w = w + lr.scale * (np.asarray(lr.b, dtype=np.float64) @ a)
    return w


def rate_bias(ir: ModelIR, layer: int, w: LayerWidths, linear=None) -> tuple[np.ndarray, np.ndarray]:
    """(b_o, b_down), each (hidden,) float32: what layer ``layer`` adds to attn_output's and
    ffn_down's outputs at widths ``w`` (zeros where nothing is pruned or ``ir`` has no means).
    ``linear(layer, role)``: the Linear as the artifact stores it (e.g. its dequantized weights,
    so the vectors are the pruned inputs' contribution through the weights that run); default
    ``ir.linear``."""
    linear = linear or ir.linear
    hp = ir.hparams
    h, H, D, F = hp.hidden_size, hp.num_heads, hp.head_dim, hp.intermediate_size
    b_o, b_d = np.zeros(h), np.zeros(h)
    m = ir.prune_means.get(layer)
    if m is not None:
        if w.ffn < F:
            b_d = _cols(linear(layer, Role.DOWN), [(w.ffn, F)]) @ np.asarray(m.down[w.ffn:], dtype=np.float64)
        if w.v_dims < D:
            ranges = [(hh * D + w.v_dims, (hh + 1) * D) for hh in range(H)]
            mo = np.concatenate([np.asarray(m.o[a:b], dtype=np.float64) for a, b in ranges])
            b_o = _cols(linear(layer, Role.O), ranges) @ mo
    return b_o.astype(np.float32), b_d.astype(np.float32)


def rate_bias_tables(ir: ModelIR, rates: Sequence[float] | None = None,
                     widths: Mapping[float, Sequence[LayerWidths]] | None = None,
                     linear=None) -> dict[float, np.ndarray] | None:
    """rate -> (num_layers, 2, hidden) float32 ([:, 0] attn_output, [:, 1] ffn_down) for every rate
    of ``ir.prune`` (or of ``widths``), or None when ``ir`` carries no means (no compensation).
    Computed a layer at a time. ``linear``: see :func:`rate_bias`."""
    if not ir.prune_means:
        return None
    if widths is None:
        if ir.prune is None:
            return None
        rates = tuple(ir.prune.rates)
        widths = {r: ir.prune.widths[r] for r in rates}
    rates = tuple(widths) if rates is None else tuple(rates)
    hp = ir.hparams
    out = {r: np.zeros((hp.num_layers, 2, hp.hidden_size), dtype=np.float32) for r in rates}
    for li in range(hp.num_layers):
        for r in rates:
            out[r][li, 0], out[r][li, 1] = rate_bias(ir, li, widths[r][li], linear)
    return out


def means_moved(ir: ModelIR, layer: int, down=None, o=None) -> dict:
    """``ir.prune_means`` with layer ``layer``'s means moved into a new column order (what a sort
    pass returns with its new IR): ``down(m)`` / ``o(m)`` map the old float64 vector to the new
    one (None: unchanged). Returns ``{}`` when ``ir`` carries no means."""
    if not ir.prune_means:
        return {}
    out = dict(ir.prune_means)
    m = out[layer]
    out[layer] = LayerMeans(down=m.down if down is None else _f32(down(np.asarray(m.down, dtype=np.float64))),
                            o=m.o if o is None else _f32(o(np.asarray(m.o, dtype=np.float64))))
    return out


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def with_prune_means(ir: ModelIR, means: Sequence[LayerMeans], source: Mapping | None = None) -> ModelIR:
    """``ir`` carrying ``means`` (one :class:`LayerMeans` per layer, in ``ir``'s current column
    order): every pruning rate then adds its bias compensation, and the sort passes carry the
    means along. Records the pass in the history."""
    if len(means) != ir.hparams.num_layers:
        raise EdgeqError(f"{PASS_NAME}: means for {len(means)} layers, model has {ir.hparams.num_layers}")
    out = ir.replace(prune_means={i: LayerMeans(down=_f32(m.down), o=_f32(m.o)) for i, m in enumerate(means)},
                     history=ir.history + (PassRecord(PASS_NAME, dict(source or {})),))
    out.validate()
    return out


__all__ = ["PASS_NAME", "means_moved", "rate_bias", "rate_bias_tables", "with_prune_means"]

"""Per-layer MLP widths from loss-vs-width curves, solved under each rate's budget: measured
curves (``--importance measured``, ``edgeq.passes.prune_sensitivity``) or FLAP's standardised
fluctuation scores (``--importance fluctuation``, :func:`fluctuation_curves`).

``plan_rates_measured`` is ``rate_plan.plan_rates`` for ``importance="measured"`` (only with
``dims="mlp"``: Q/K pairs and V/O components keep their full width, the MLP gives up the whole
parameter budget, as in ``rate_plan``). Its input is one curve per layer: ``curves[l, j]`` the
predicted loss (end-to-end KL to the unpruned model, ``edgeq.passes.prune_sensitivity``) when
layer ``l`` alone keeps the first ``grid[j]`` MLP channels, ``grid`` the rounding grid of
``rate_plan`` (multiples of the granularity, the full width last). Losses of different layers
are taken to add.

Solve (greedy on marginal loss per parameter, one sequence for all rates): start at full width;
repeatedly take one grid step down in the layer whose *best average* cost per removed parameter
over any number of further steps, ``min_k (curve[j-k] - curve[j]) / (params removed by k steps)``,
is smallest (ties: the lowest layer). Looking ahead over ``k`` steps lets a layer whose curve is
not convex (a flat stretch after a steep step) be judged by the whole stretch, not its first
step. The greedy removes steps while one reduces ``|kept - (1 - rate) * total|`` strictly, and the
rate's widths are the state where it stops; the next (larger) rate continues from that state, so
every rate's widths are at most the previous rate's: nested prefixes of one sorted order.
The budget is met to half a step (``rate_plan.rate_tolerance``), the same rule as ``rate_plan``.

No layer's MLP goes below ``(1 - max_prune)`` of its channels (the cap of ``rate_plan``),
rounded up to the grid; a rate the caps cannot reach is refused.

Deterministic: the curves are rounded to 6 significant digits before the solve (a few ulps of
difference in a measured KL, e.g. from another thread count, does not flip a tie), and ties go
to the lowest layer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import HParams, LayerWidths, ModelIR, PruneSpec, full_widths
from edgeq.passes.rate_plan import (MAX_LAYER_PRUNE, RATE_EQ, width_grid, model_hparams, unit_params, check_rates, rate_tolerance,
                                    realised_rate, total_prunable_params)

DIGITS = 6  # significant digits the curves are rounded to before the solve


def mlp_grid(hp: HParams, granularity: int) -> np.ndarray:
    """The MLP widths a rate may keep (``rate_plan``'s grid): multiples of ``granularity``, full last."""
    return width_grid(hp.intermediate_size, int(granularity))


def round_sig(a: np.ndarray, digits: int = DIGITS) -> np.ndarray:
    """``a`` rounded to ``digits`` significant digits (zeros and signs kept)."""
    a = np.asarray(a, dtype=np.float64)
    return np.array([float(f"{x:.{digits - 1}e}") for x in a.ravel()]).reshape(a.shape)


def _best_cost(curve: np.ndarray, grid: np.ndarray, j: int, lo: int) -> float:
    """Lowest average loss per removed channel of going down k >= 1 steps from index ``j``."""
    if j <= lo:
        return np.inf
    ks = np.arange(lo, j)
    return float(np.min((curve[ks] - curve[j]) / (grid[j] - grid[ks])))


def plan_rates_measured(model: ModelIR | HParams, rates: Sequence[float], granularity: int,
                        curves: np.ndarray, max_prune: float = MAX_LAYER_PRUNE,
                        importance: str = "measured") -> PruneSpec:
    """Kept widths of every layer at every rate from the loss ``curves`` (L, len(grid)) (the
    module docstring); Q/K pairs and V/O components stay full. ``importance``: what the curves
    are, recorded in the spec ("measured", or "fluctuation": :func:`fluctuation_curves`).
    Deterministic."""
    hp = model_hparams(model)
    if isinstance(granularity, bool) or not isinstance(granularity, (int, np.integer)) or granularity <= 0:
        raise EdgeqError(f"prune granularity must be a positive integer, got {granularity!r}")
    if not (0.0 < max_prune < 1.0):
        raise EdgeqError(f"max_prune must be in (0, 1), got {max_prune!r}")
    rates = check_rates(rates)
    grid = mlp_grid(hp, granularity)
    L, K = hp.num_layers, grid.size
    curves = np.asarray(curves, dtype=np.float64)
    if curves.shape != (L, K):
        raise EdgeqError(f"measured allocation: expected loss curves of shape {(L, K)} (layers x MLP widths "
                         f"{grid[0]}..{grid[-1]}), got {curves.shape}")
    if not np.all(np.isfinite(curves)):
        raise EdgeqError("measured allocation: the loss curves hold non-finite values")
    curves = round_sig(curves)
    lo = int(np.searchsorted(grid, (1.0 - max_prune) * hp.intermediate_size - 1e-9))
    lo = min(lo, K - 1)
    unit = unit_params(hp)[0]
    total = total_prunable_params(hp)
    tol = rate_tolerance(hp, granularity)
    full = full_widths(hp)
    idx = np.full(L, K - 1, dtype=np.int64)
    cost = np.array([_best_cost(curves[l], grid, K - 1, lo) for l in range(L)])
    kept = total
    widths: dict[float, tuple[LayerWidths, ...]] = {}
    for rate in rates:
        target = (1.0 - rate) * total
        while True:
            err = kept - target
            ok = [l for l in range(L) if idx[l] > lo
                  and abs(err - unit * (grid[idx[l]] - grid[idx[l] - 1])) < abs(err)]
            if not ok:
                break
            l = min(ok, key=lambda i: (cost[i], i))
            kept -= unit * int(grid[idx[l]] - grid[idx[l] - 1])
            idx[l] -= 1
            cost[l] = _best_cost(curves[l], grid, int(idx[l]), lo)
        ws = tuple(LayerWidths(ffn=int(grid[i]), qk_pairs=full.qk_pairs, v_dims=full.v_dims) for i in idx)
        got = realised_rate(hp, ws)
        if abs(got - rate) > tol + RATE_EQ:
            raise EdgeqError(f"pruning rate {rate:g} cannot come from the MLP alone with every layer keeping at "
                             f"least {1 - max_prune:.0%} of its channels (realised {got:.4f}); use a smaller rate")
        widths[rate] = ws
    return PruneSpec(rates=rates, widths=widths, granularity=int(granularity), importance=importance, dims="mlp")


def fluctuation_curves(scores: Sequence[np.ndarray], grid: np.ndarray) -> np.ndarray:
    """FLAP's adaptive structure search as loss curves for :func:`plan_rates_measured`.

    ``scores[l]``: layer ``l``'s MLP channel scores (FLAP's fluctuation metric,
    ``edgeq.passes.sort_flap``) in the sorted order, descending. FLAP standardises each layer's
    scores, ``(s - mean_l) / std_l`` (over the layer's channels, ``std`` with ``N - 1`` as torch's),
    and prunes the channels under one threshold shared by all layers. As curves:
    ``curve[l, j] = sum`` of the standardised scores of the channels ``grid[j]..`` that keeping
    ``grid[j]`` drops (0 at full width). Every channel carries the same parameters, so the
    greedy's cost of a grid step is the mean standardised score of the block it drops: the
    greedy takes blocks in ascending order of that mean across layers (the scores descend
    within a layer, so its blocks come in that order: the curves are convex and the look-ahead
    changes nothing), i.e. FLAP's global threshold at the grid's resolution, stopped at each
    rate's budget. A layer with constant scores (std 0) gets zeros."""
    grid = np.asarray(grid, dtype=np.int64)
    out = np.zeros((len(scores), grid.size))
    for l, s in enumerate(scores):
        s = np.asarray(s, dtype=np.float64)
        if s.ndim != 1 or s.size != grid[-1] or not np.all(np.isfinite(s)):
            raise EdgeqError(f"fluctuation allocation: layer {l}: expected {grid[-1]} finite channel scores, "
                             f"got shape {s.shape}")
        if np.any(np.diff(s) > 0):
            raise EdgeqError(f"fluctuation allocation: layer {l}: the scores are not in descending order "
                             "(the channels were not sorted by them)")
        sd = float(np.std(s, ddof=1)) if s.size > 1 else 0.0
        z = (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
        tail = np.concatenate([np.cumsum(z[::-1])[::-1], [0.0]])  # tail[f] = sum of z[f:]
        out[l] = tail[grid]
    return out


__all__ = ["DIGITS", "fluctuation_curves", "mlp_grid", "plan_rates_measured", "round_sig"]

"""Pruning-rate plan: per-layer kept widths for every global rate an artifact carries.

What is pruned
--------------
Per layer, three sorted dimensions keep a prefix (``LayerWidths``): ``ffn`` MLP channels,
``qk_pairs`` RoPE pairs per Q/K head and ``v_dims`` V/O components per KV group. Embeddings,
lm_head, norms and the hidden size are never pruned. With hidden ``h``, heads ``H`` and KV heads
``KV``, a layer at widths ``w`` holds these prunable parameters (``prunable_params``)::

    Q, K rows            2 * w.qk_pairs * (H + KV) * h
    V rows + O columns   w.v_dims * (KV + H) * h
    gate, up, down       3 * w.ffn * h

The global rate is ``r = 1 - sum_l kept_l / sum_l full_l`` (``realised_rate``); biases are not
counted (they follow their rows).

Per-layer allocation (``layer_keep_ratios``)
-------------------------------------------
UniQL: ``phi_l = L * phi_avg * softmax(-s / eps)_l`` with ``s_l`` the layer importance (angular
distance ``1 - cos(x_in, x_out)``: larger = more important = pruned less), clamped to
``[0, max_prune]``; keep = 1 - phi. UniQL stops there, so after the clamp its average drifts off
the target. Here the clamp is part of the solve: ``phi_l = min(max_prune, c * softmax_l)`` with
the scalar ``c`` found by exact water-filling so that the parameter-weighted mean of ``phi`` is
exactly ``rate``. ``max_prune`` defaults to ``MAX_LAYER_PRUNE = 0.8`` (no layer loses more than
80% of its prunable parameters in the continuous allocation); a rate above it is refused.
``phi_l`` is non-decreasing in the rate (``c`` grows with it), so kept widths nest.
A third allocation, ``importance="measured"`` (MLP channels only), solves the widths from each
layer's measured loss-vs-width curve instead: ``edgeq.passes.prune_alloc``; a fourth,
``importance="fluctuation"`` (MLP channels only, after the FLAP sort), from FLAP's standardised
fluctuation scores compared across layers (``prune_alloc.fluctuation_curves``).

Rounding (``plan_rates``)
-------------------------
Every dimension of a layer gets the layer's keep ratio; the ideal widths ``keep * full`` are
rounded to the nearest point of their grid:

* ``ffn``: multiples of ``granularity`` (the target's prune granularity, itself a multiple of its
  quant block). ffn_down is pruned along its *input* dimension, the one quant blocks run along,
  so a kept prefix must end on a block boundary to stay a group-aligned prefix of the stored,
  quantized tensor.
* ``qk_pairs`` and ``v_dims``: multiples of 2. In the runtime layout (see
  ``runtimes/reference.py``) Q/K/V rows and the rows of the transposed O are all pruned along the
  *output* dimension, while quant blocks run along the hidden (input) dimension: dropping rows
  never splits a block, so these need no block alignment.

Every grid also holds the full width (rate 0 keeps everything) and starts at one step (no width
is ever pruned to nothing). Widths are capped by the previous (smaller) rate's widths, so they are
monotone non-increasing in the rate for every layer and dimension (nested prefixes).

Rounding then moves the realised rate off the target; a deterministic greedy repair fixes it:
while some single one-step move (one dimension of one layer, within its bounds, in the direction
that reduces the error) strictly reduces ``|kept - (1 - rate) * total|``, apply the one whose
width is furthest from its ideal (in its own steps; ties: lowest layer, then ffn, qk, v).

Dimensions (``dims``)
---------------------
``dims="all"`` (default) prunes all three dimensions as above. ``dims="mlp"`` prunes only the MLP
channels: Q/K pairs and V/O components keep their full width at every rate, and the MLP gives up
the whole parameter budget, so the global rate (prunable parameters removed, counted over all
three dimensions as above) is still the requested one. The per-layer allocation is then solved
over the MLP parameters (``layer_keep_ratios`` with rate ``rate * total / mlp_total`` and the
layers' MLP parameters as weights; the same ``max_prune`` cap now per layer's MLP), and the
rounding moves only ``ffn``. Measured on SmolLM2-135M (docs/benchmarks.md, issue 15; fp32, 1024
scored positions): at the same parameter rate the MLP-only plan has 0.63x the KL of the
all-dimensions plan (perplexity ratio 2.25x -> 1.59x at 0.15, 4.62x -> 2.48x at 0.25).

Tolerance (``rate_tolerance``): one granularity step of the coarsest dimension,

    tol = h * max(3 * granularity, 4 * (H + KV)) / P_total,   P_total = sum_l full_l,

i.e. the parameters of the largest single move (an ``ffn`` step of ``granularity`` channels, or a
``qk_pairs`` step of 2 pairs). ``|realised - requested| <= tol`` is asserted for every rate; the
greedy in fact reaches ``tol / 2`` (any move is at most one step, so while the error exceeds half
a step a move in the right direction still reduces it), unless a rate is unreachable because every
width is at its one-step minimum (EdgeqError).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import HParams, LayerWidths, ModelIR, PassRecord, PruneSpec, full_widths

MAX_RATE = 0.9  # the largest global rate accepted anywhere
MAX_LAYER_PRUNE = 0.8  # default per-layer clamp of the continuous allocation
DEFAULT_RATES = (0.0, 0.15, 0.25, 0.35)
DEFAULT_EPS = 0.1  # UniQL's softmax temperature
HEAD_STEP = 2  # qk_pairs and v_dims are multiples of this
RATE_EQ = 1e-9  # two rates closer than this are the same rate
MODES = ("angular", "uniform")  # "measured" (per-layer loss curves) is edgeq.passes.prune_alloc
DIMS = ("all", "mlp")  # what a rate prunes: every dimension, or the MLP channels only


# ---------------------------------------------------------------------------------------------
# Counting


def model_hparams(model: ModelIR | HParams) -> HParams:
    if isinstance(model, ModelIR):
        return model.hparams
    if isinstance(model, HParams):
        return model
    raise EdgeqError(f"expected a ModelIR or HParams, got {type(model).__name__}")


def unit_params(hp: HParams) -> tuple[int, int, int]:
    """Prunable parameters per unit of (ffn, qk_pairs, v_dims)."""
    h, H, KV = hp.hidden_size, hp.num_heads, hp.num_kv_heads
    return 3 * h, 2 * (H + KV) * h, (KV + H) * h


def prunable_params(hp: HParams, w: LayerWidths) -> int:
    """Prunable parameters one layer keeps at widths ``w``."""
    uf, uq, uv = unit_params(hp)
    return uf * w.ffn + uq * w.qk_pairs + uv * w.v_dims


def total_prunable_params(hp: HParams) -> int:
    return hp.num_layers * prunable_params(hp, full_widths(hp))


def realised_rate(model: ModelIR | HParams, widths: Sequence[LayerWidths]) -> float:
    """The global rate ``1 - kept / total`` (prunable parameters) that ``widths`` realise."""
    hp = model_hparams(model)
    if len(widths) != hp.num_layers:
        raise EdgeqError(f"expected widths for {hp.num_layers} layers, got {len(widths)}")
    kept = sum(prunable_params(hp, w) for w in widths)
    return 1.0 - kept / total_prunable_params(hp)


def rate_tolerance(model: ModelIR | HParams, granularity: int) -> float:
    """Largest allowed ``|realised - requested|``: one step of the coarsest dimension,
    ``h * max(3 * granularity, 4 * (H + KV)) / total_prunable_params``."""
    hp = model_hparams(model)
    h, H, KV = hp.hidden_size, hp.num_heads, hp.num_kv_heads
    return h * max(3 * granularity, 2 * HEAD_STEP * (H + KV)) / total_prunable_params(hp)


# ---------------------------------------------------------------------------------------------
# Rates


def check_rates(rates: Iterable[float]) -> tuple[float, ...]:
    """Validate rates and return them sorted, with 0 (the full model, always carried) first.

    Refuses non-numbers, NaN, negatives, rates >= 1 or > MAX_RATE and duplicates."""
    out: list[float] = []
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, (int, float, np.floating, np.integer)):
            raise EdgeqError(f"pruning rate must be a number, got {r!r}")
        r = float(r)
        if not math.isfinite(r):
            raise EdgeqError(f"pruning rate must be finite, got {r}")
        if r < 0:
            raise EdgeqError(f"pruning rate must be >= 0, got {r:g}")
        if r >= 1:
            raise EdgeqError(f"pruning rate must be < 1 (a fraction of the prunable parameters), got {r:g}")
        if r > MAX_RATE:
            raise EdgeqError(f"pruning rate {r:g} exceeds the maximum {MAX_RATE:g}")
        for q in out:
            if abs(q - r) < RATE_EQ:
                raise EdgeqError(f"pruning rate {r:g} is given twice")
        out.append(r)
    if not any(abs(r) < RATE_EQ for r in out):
        out.append(0.0)
    return tuple(sorted(0.0 if abs(r) < RATE_EQ else r for r in out))


def parse_rates(text: str) -> tuple[float, ...]:
    """``"0,0.15,0.25"`` -> ``(0.0, 0.15, 0.25)``; sorted, 0 added when missing (see check_rates)."""
    if not isinstance(text, str) or not text.strip():
        raise EdgeqError("expected a comma-separated list of pruning rates such as '0,0.15,0.25', got nothing")
    vals: list[float] = []
    for part in text.split(","):
        p = part.strip()
        if not p:
            raise EdgeqError(f"empty entry in pruning rates {text!r}; expected e.g. '0,0.15,0.25'")
        try:
            vals.append(float(p))
        except ValueError:
            raise EdgeqError(f"pruning rate {p!r} is not a number (in {text!r})") from None
    return check_rates(vals)


# ---------------------------------------------------------------------------------------------
# Allocation


def layer_keep_ratios(importance: np.ndarray | None, rate: float, eps: float = DEFAULT_EPS,
                      mode: str = "angular", max_prune: float = MAX_LAYER_PRUNE,
                      weights: np.ndarray | None = None) -> np.ndarray:
    """Per-layer keep ratios ``1 - phi_l`` whose ``weights``-weighted mean of ``phi`` is ``rate``.

    ``mode="angular"``: ``phi_l = min(max_prune, c * softmax(-importance / eps)_l)`` with ``c``
    solved exactly (water-filling) — UniQL's ``L * phi_avg * softmax`` renormalised after the
    clamp. ``mode="uniform"``: ``phi_l = rate``. ``weights`` are the layers' prunable parameter
    counts (default: equal). Rates above ``max_prune`` cannot be reached and are refused.
    ``importance`` may be None only in uniform mode (then ``weights`` gives the layer count).
    """
    if mode not in MODES:
        raise EdgeqError(f"layer allocation mode must be one of {', '.join(MODES)}, got {mode!r}")
    rate = float(rate)
    if not (0.0 <= rate < 1.0) or not math.isfinite(rate):
        raise EdgeqError(f"pruning rate must be in [0, 1), got {rate!r}")
    if not (0.0 < max_prune < 1.0):
        raise EdgeqError(f"max_prune must be in (0, 1), got {max_prune!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise EdgeqError(f"eps must be a positive number, got {eps!r}")
    if importance is None:
        if mode == "angular":
            raise EdgeqError("mode='angular' needs per-layer importance scores (from calibration); "
                             "pass importance=... or use mode='uniform'")
        if weights is None:
            raise EdgeqError("uniform allocation without importance needs weights (one per layer)")
        n = len(weights)
    else:
        importance = np.asarray(importance, dtype=np.float64)
        if importance.ndim != 1 or importance.size == 0 or not np.all(np.isfinite(importance)):
            raise EdgeqError(f"importance must be a non-empty 1-D array of finite scores, got shape "
                             f"{importance.shape}")
        n = importance.size
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or np.any(w <= 0):
        raise EdgeqError(f"weights must be {n} positive numbers, got shape {w.shape}")
    if rate > max_prune + RATE_EQ:
        raise EdgeqError(f"pruning rate {rate:g} exceeds the per-layer pruning cap max_prune={max_prune:g}")
    if rate == 0.0:
        return np.ones(n)
    if mode == "uniform":
        return np.full(n, 1.0 - rate)
    # phi_l = min(cap, c * softmax_l), solved in log space so that layers whose softmax weight
    # underflows still take their share: log(c * softmax_l) = log c + z_l - logsumexp(z), z = -s/eps
    z = -importance / eps
    W = w.sum()
    if rate >= max_prune - RATE_EQ:
        phi = np.full(n, max_prune)
    else:
        sat = np.zeros(n, dtype=bool)
        while True:  # water-filling: at most n rounds, each saturates at least one more layer
            free = ~sat
            m = z[free].max()
            log_c = (np.log(rate * W - max_prune * w[sat].sum())
                     - (m + np.log((w[free] * np.exp(z[free] - m)).sum())))
            log_phi = log_c + z
            new = sat | (log_phi > np.log(max_prune))
            if np.array_equal(new, sat):
                break
            sat = new
        phi = np.where(sat, max_prune, np.exp(np.minimum(log_phi, np.log(max_prune))))
    phi = np.clip(phi, 0.0, max_prune)
    return 1.0 - phi


# ---------------------------------------------------------------------------------------------
# Rounding


def width_grid(full: int, step: int) -> np.ndarray:
    """Allowed widths: one step, two steps, ... up to ``full``; ``full`` is always allowed."""
    g = list(range(step, full + 1, step))
    if not g or g[-1] != full:
        g.append(full)
    return np.asarray(g, dtype=np.int64)


def _nearest(grid: np.ndarray, x: float) -> int:
    """Index of the grid point nearest to x (ties -> the larger width)."""
    j = int(np.searchsorted(grid, x))
    if j <= 0:
        return 0
    if j >= grid.size:
        return grid.size - 1
    return j if grid[j] - x <= x - grid[j - 1] else j - 1


def _round_rate(hp: HParams, grids: list[np.ndarray], ideal: np.ndarray, upper: np.ndarray,
                rate: float, movable: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """Grid indices (L, 3) near ``ideal`` widths, ``<= upper`` indices, hitting ``rate``; the
    repair moves only the dimensions in ``movable`` (0 ffn, 1 qk_pairs, 2 v_dims)."""
    L = hp.num_layers
    units = np.asarray(unit_params(hp), dtype=np.int64)
    idx = np.empty((L, 3), dtype=np.int64)
    for l in range(L):
        for d in range(3):
            idx[l, d] = min(_nearest(grids[d], ideal[l, d]), upper[l, d])
    total = total_prunable_params(hp)
    target = (1.0 - rate) * total

    def kept() -> int:
        return int(sum(units[d] * grids[d][idx[l, d]] for l in range(L) for d in range(3)))

    k = kept()
    while True:
        err = k - target  # > 0: keeping too much, prune more
        if err == 0:
            break
        down = err > 0
        best = None
        for l in range(L):
            for d in movable:
                j = idx[l, d]
                nj = j - 1 if down else j + 1
                if nj < 0 or nj > upper[l, d]:
                    continue
                delta = int(units[d] * (grids[d][nj] - grids[d][j]))
                if abs(err + delta) >= abs(err):
                    continue
                step = abs(int(grids[d][nj] - grids[d][j]))
                off = (grids[d][j] - ideal[l, d]) / step
                pressure = off if down else -off
                key = (-pressure, l, d)
                if best is None or key < best[0]:
                    best = (key, l, d, nj, delta)
        if best is None:
            break
        _, l, d, nj, delta = best
        idx[l, d] = nj
        k += delta
    return idx


def plan_rates(model: ModelIR | HParams, rates: Sequence[float] = DEFAULT_RATES, granularity: int = 32,
               importance: np.ndarray | None = None, mode: str = "angular", eps: float = DEFAULT_EPS,
               max_prune: float = MAX_LAYER_PRUNE, dims: str = "all") -> PruneSpec:
    """Kept widths of every layer at every rate (see the module docstring for the rules).

    ``dims``: "all" (MLP channels, Q/K pairs, V/O components) or "mlp" (MLP channels only, the
    same parameter rate).

    ``granularity``: the target's prune granularity (``TargetProfile.prune_granularity``), the
    step of ``ffn``. ``importance``: per-layer angular distances (required for ``mode="angular"``).
    Rates are validated by ``check_rates`` (0 is added when missing). Deterministic.
    """
    hp = model_hparams(model)
    if isinstance(granularity, bool) or not isinstance(granularity, (int, np.integer)) or granularity <= 0:
        raise EdgeqError(f"prune granularity must be a positive integer, got {granularity!r}")
    granularity = int(granularity)
    rates = check_rates(rates)
    if dims not in DIMS:
        raise EdgeqError(f"pruned dimensions must be one of {', '.join(DIMS)}, got {dims!r}")
    if hp.qk_norm and dims != "mlp":
        raise EdgeqError("Q/K pairs under QK-norm are exempt from pruning (the norm is over the whole head dim); "
                         "use --prune-dims mlp")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float64)
        if importance.shape != (hp.num_layers,):
            raise EdgeqError(f"importance: expected {hp.num_layers} per-layer scores, got shape {importance.shape}")
    full = full_widths(hp)
    grids = [width_grid(full.ffn, granularity), width_grid(full.qk_pairs, HEAD_STEP), width_grid(full.v_dims, HEAD_STEP)]
    fullv = np.array([full.ffn, full.qk_pairs, full.v_dims], dtype=np.float64)
    layer_w = np.full(hp.num_layers, float(prunable_params(hp, full)))
    mlp_share = unit_params(hp)[0] * full.ffn / prunable_params(hp, full)  # MLP part of a layer's parameters
    tol = rate_tolerance(hp, granularity)
    upper = np.tile([g.size - 1 for g in grids], (hp.num_layers, 1)).astype(np.int64)
    widths: dict[float, tuple[LayerWidths, ...]] = {}
    for rate in rates:
        if rate == 0.0:
            widths[rate] = (full,) * hp.num_layers
            continue
        if dims == "mlp":
            if rate / mlp_share > max_prune + RATE_EQ:
                raise EdgeqError(f"pruning rate {rate:g} cannot come from the MLP alone: it would remove "
                                 f"{rate / mlp_share:.0%} of the MLP parameters (cap {max_prune:.0%}); "
                                 "use --prune-dims all or a smaller rate")
            keep = layer_keep_ratios(importance, rate / mlp_share, eps=eps, mode=mode, max_prune=max_prune,
                                     weights=layer_w * mlp_share)
            ideal = np.tile(fullv, (hp.num_layers, 1))
            ideal[:, 0] = keep * fullv[0]
            idx = _round_rate(hp, grids, ideal, upper, rate, movable=(0,))
        else:
            keep = layer_keep_ratios(importance, rate, eps=eps, mode=mode, max_prune=max_prune, weights=layer_w)
            ideal = keep[:, None] * fullv[None, :]
            idx = _round_rate(hp, grids, ideal, upper, rate)
        ws = tuple(LayerWidths(ffn=int(grids[0][i[0]]), qk_pairs=int(grids[1][i[1]]), v_dims=int(grids[2][i[2]]))
                   for i in idx)
        got = realised_rate(hp, ws)
        if abs(got - rate) > tol:
            raise EdgeqError(f"pruning rate {rate:g} cannot be reached with granularity {granularity} "
                             f"(realised {got:.4f}, tolerance {tol:.4f}): every width is at its minimum "
                             f"of one step or at the cap of the previous rate")
        widths[rate] = ws
        upper = idx
    return PruneSpec(rates=rates, widths=widths, granularity=granularity,
                     importance=mode, dims=dims)


def apply_prune_spec(ir: ModelIR, spec: PruneSpec, measured: dict | None = None) -> ModelIR:
    """``ir`` carrying ``spec`` (validated against its shapes); records the pass in the history
    (with ``measured``: what the measured allocation measured, ``edgeq.passes.prune_sensitivity``)."""
    if not isinstance(spec, PruneSpec):
        raise EdgeqError(f"expected a PruneSpec, got {type(spec).__name__}")
    out = ir.replace(prune=spec, history=ir.history + (PassRecord(
        "rate_plan", {"rates": list(spec.rates), "granularity": spec.granularity,
                      "importance": spec.importance, **({"dims": spec.dims} if spec.dims != "all" else {}),
                      **({"measured": measured} if measured is not None else {})}),))
    out.validate()
    return out


__all__ = ["DIMS", "MAX_RATE", "MAX_LAYER_PRUNE", "DEFAULT_RATES", "apply_prune_spec", "check_rates", "full_widths",
           "layer_keep_ratios", "parse_rates", "plan_rates", "prunable_params", "rate_tolerance",
           "realised_rate", "total_prunable_params"]

"""Measured sensitivity of each layer's MLP to pruning: a loss-vs-width curve per layer.

For layer ``l`` keeping the first ``f`` of its (sorted) MLP channels, everything else at full
width, the predicted end-to-end loss is

    kl_l(f) = gain_l(f) * err_l(f)

* ``err_l(f)``: the mean squared error the pruning adds to the layer's MLP output on the probe
  tokens, ``E |W_down[:, f:] (z[f:] - c[f:])|^2`` (``z`` ffn_down's input, ``c`` the bias
  compensation's stored means ``ModelIR.prune_means`` when the model carries them, else 0: the
  error of the model as it will run). Computed for every width of the grid from one forward:
  ffn_down's output is accumulated block by block from the last channel block down.
* ``gain_l(f)``: KL(unpruned || layer l pruned to f) / err_l(f) *measured* at a few probe widths
  (``PROBE_KEEPS`` of the channels, on the grid): the model's tail from layer ``l`` is re-run on
  the probe sequences with that one layer pruned (the residual stream at every layer's input is
  cached from the unpruned forward, as in the planner's ``edgeq.quant.sensitivity.KLProbe``).
  Between probe widths the gain is interpolated linearly in the width; beyond them it is the
  nearest probe's. At a probe width the prediction is the measured KL itself.

So the curve's scale (how much a layer's output error costs at the end of the model) is measured,
and its shape between the measured points comes from the layer's own reconstruction error.
``edgeq.passes.prune_alloc`` solves the widths from these curves.

Cost: one forward of the whole model on the probe sequences plus ``len(PROBE_KEEPS)`` tail
re-runs per layer (O(layers^2) layer forwards, like the planner's probe). Memory: the whole
model in float32 (torch) and every layer's input residual stream on the probe tokens — the same
as the planner's KL probe (``edgeq.memory.probe_bytes``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from edgeq.errors import require
from edgeq.ir import ModelIR, Role, full_widths
from edgeq.passes.prune_alloc import mlp_grid

PROBE_KEEPS = (0.75, 0.5, 0.25)  # fractions of the MLP channels kept at the measured points


def _down_weight(model, layer: int):
    """ffn_down's effective weight (hidden, d_ff), float64: the stored weight plus frozen branches."""
    torch = model.torch
    w, _, frozen = model.base[layer][Role.DOWN]
    w = w.double()
    for fa, fb, fs in frozen:
        w = w + fs * (fb.double() @ fa.double())
    return w


def output_error_curve(model, layer: int, z, grid: np.ndarray) -> np.ndarray:
    """``err(grid[j])`` for every j: mean over tokens of ``|W[:, f:] (z[f:] - c[f:])|^2`` with
    ``c`` the layer's compensation means (0 without them). ``z``: ffn_down's input (..., d_ff)."""
    torch = model.torch
    W = _down_weight(model, layer)
    Z = z.reshape(-1, z.shape[-1]).double()
    means = model.means[layer]
    c = None if means is None else means[1].double()
    out = np.zeros(grid.size)
    S = torch.zeros(Z.shape[0], W.shape[0], dtype=torch.float64)
    b = torch.zeros(W.shape[0], dtype=torch.float64)
    hi = int(grid[-1])
    for j in range(grid.size - 2, -1, -1):  # dropping channels [grid[j], d_ff): add block [grid[j], hi)
        lo = int(grid[j])
        S += Z[:, lo:hi] @ W[:, lo:hi].T
        if c is not None:
            b += W[:, lo:hi] @ c[lo:hi]
        out[j] = float(((S - b) ** 2).sum(-1).mean())
        hi = lo
    return out


def probe_indices(grid: np.ndarray, d_ff: int, keeps: Sequence[float] = PROBE_KEEPS) -> list[int]:
    """Grid indices nearest to ``keep * d_ff`` for each probe fraction (distinct, below full, sorted)."""
    out = {int(np.argmin(np.abs(grid - k * d_ff))) for k in keeps}
    return sorted(j for j in out if j < grid.size - 1)


def interpolate_gain(grid: np.ndarray, probes: Sequence[int], gains: Sequence[float]) -> np.ndarray:
    """Gain at every grid width: linear in the width between probe widths, constant beyond."""
    xs = np.asarray([grid[j] for j in probes], dtype=np.float64)
    return np.interp(grid.astype(np.float64), xs, np.asarray(gains, dtype=np.float64))


def mlp_loss_curves(ir: ModelIR, sequences: Sequence[Sequence[int]], granularity: int,
                    keeps: Sequence[float] = PROBE_KEEPS, log: Callable[[str], None] | None = None
                    ) -> tuple[np.ndarray, dict]:
    """(curves (L, len(grid)) float64, record): predicted KL of each layer's MLP pruned alone to
    each grid width (``edgeq.passes.prune_alloc.mlp_grid``); the record holds what was measured
    (probe widths, KL at them, per layer) for the pass history."""
    torch = require("torch", "frontend")
    from edgeq.passes.recover import LoraModel

    hp = ir.hparams
    grid = mlp_grid(hp, granularity)
    L = hp.num_layers
    model = LoraModel(ir, rank=1)
    ids = torch.tensor(np.asarray(sequences, dtype=np.int64))
    errs = np.zeros((L, grid.size))
    inputs: list = []
    linear = model._linear

    def tapped(x, layer, role, use_lora, rows=None, cols=None):
        if role == Role.DOWN and cols is None:
            errs[layer] = output_error_curve(model, layer, x, grid)
        return linear(x, layer, role, use_lora, rows, cols)

    model._linear = tapped
    try:
        with torch.no_grad():
            final = model.hidden(ids, use_lora=False, collect=inputs)
    finally:
        del model._linear
    with torch.no_grad():
        ref_logp = torch.log_softmax((final @ model.out_w.T).double(), dim=-1)
    ref_p = ref_logp.exp()
    probes = probe_indices(grid, hp.intermediate_size, keeps)
    full = full_widths(hp)
    curves = np.zeros((L, grid.size))
    kls = np.zeros((L, len(probes)))
    for l in range(L):
        gains = []
        for n, j in enumerate(probes):
            widths = [full] * L
            widths[l] = full.__class__(ffn=int(grid[j]), qk_pairs=full.qk_pairs, v_dims=full.v_dims)
            with torch.no_grad():
                h = model.hidden(ids, widths=widths, use_lora=False, start=l, x=inputs[l])
                logq = torch.log_softmax((h @ model.out_w.T).double(), dim=-1)
            kl = max(float((ref_p * (ref_logp - logq)).sum(-1).mean()), 0.0)
            kls[l, n] = kl
            gains.append(kl / errs[l, j] if errs[l, j] > 0 else 0.0)
        curves[l] = interpolate_gain(grid, probes, gains) * errs[l]
        curves[l, -1] = 0.0  # full width: nothing pruned
        if log is not None:
            log(f"layer {l}: KL at ffn {', '.join(f'{grid[j]}: {k:.4g}' for j, k in zip(probes, kls[l]))}")
    record = {"probe_sequences": len(sequences), "probe_tokens": int(ids.numel()),
              "probe_widths": [int(grid[j]) for j in probes],
              "probe_kl": [[float(f"{k:.4e}") for k in row] for row in kls]}
    return curves, record


def plan_measured(ir: ModelIR, sequences: Sequence[Sequence[int]], rates: Sequence[float], granularity: int,
                  dims: str = "mlp", log: Callable[[str], None] | None = None) -> tuple:
    """(PruneSpec, record): the curves of :func:`mlp_loss_curves` on ``sequences`` solved for every
    rate by ``edgeq.passes.prune_alloc.plan_rates_measured`` (MLP channels only: ``dims`` "mlp")."""
    from edgeq.errors import EdgeqError
    from edgeq.passes.prune_alloc import plan_rates_measured

    if dims != "mlp":
        raise EdgeqError("--importance measured allocates MLP channels only; add --prune-dims mlp")
    if log is not None:
        log(f"measuring each layer's MLP loss-vs-width curve on {len(sequences)} calibration sequences")
    curves, rec = mlp_loss_curves(ir, sequences, granularity)
    return plan_rates_measured(ir, rates, granularity, curves), rec


__all__ = ["PROBE_KEEPS", "interpolate_gain", "mlp_loss_curves", "output_error_curve", "plan_measured",
           "probe_indices"]

"""The measured allocation's solve (edgeq.passes.prune_alloc) on synthetic loss curves: the budget
is met to half a step, rates nest, the solve is deterministic, it matches an exhaustive search
where greedy is provably optimal (convex curves), and a more sensitive layer keeps more width."""
import itertools

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.ir import Arch, HParams
from edgeq.passes.prune_alloc import mlp_grid, plan_rates_measured
from edgeq.passes.rate_plan import unit_params, rate_tolerance, realised_rate, total_prunable_params

RATES = (0.0, 0.05, 0.15, 0.25, 0.35)


def _hp(layers=6, h=64, f=256, heads=4, kv=2, d=16):
    return HParams(arch=Arch.LLAMA, vocab_size=100, hidden_size=h, intermediate_size=f, num_layers=layers,
                   num_heads=heads, num_kv_heads=kv, head_dim=d, rope_theta=10000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=512, tie_word_embeddings=False, attention_bias=False)


def _curves(hp, granularity, seed=0, convex=False):
    """Random decreasing loss curves (loss 0 at full width), one per layer, scales spread 100x."""
    rng = np.random.RandomState(seed)
    grid = mlp_grid(hp, granularity)
    out = np.zeros((hp.num_layers, grid.size))
    for l in range(hp.num_layers):
        steps = rng.rand(grid.size - 1)  # loss added by each step down from full width
        if convex:
            steps = np.sort(steps)  # increments grow as the width shrinks
        else:
            steps = steps ** 3 + 0.01  # uneven, not convex; every step costs something
        out[l, :-1] = np.cumsum(steps[::-1])[::-1] * 10 ** rng.uniform(-1, 1)
    return out


@pytest.mark.parametrize("granularity,f", [(32, 256), (16, 200), (64, 1536)])
def test_budget_met_to_half_a_step_and_rates_nested(granularity, f):
    hp = _hp(f=f)
    spec = plan_rates_measured(hp, RATES, granularity, _curves(hp, granularity))
    half = unit_params(hp)[0] * granularity / total_prunable_params(hp) / 2
    assert half <= rate_tolerance(hp, granularity)
    prev = None
    for r in spec.rates:
        ws = spec.widths[r]
        assert abs(realised_rate(hp, ws) - r) <= half + 1e-12, r
        assert all(w.qk_pairs == hp.head_dim // 2 and w.v_dims == hp.head_dim for w in ws)  # MLP only
        assert all(w.ffn in mlp_grid(hp, granularity) for w in ws)
        assert all(w.ffn >= 0.2 * f for w in ws)  # the per-layer cap
        if prev is not None:
            assert all(a.ffn <= b.ffn for a, b in zip(ws, prev))  # nested prefixes
        prev = ws
    assert spec.importance == "measured" and spec.dims == "mlp"
    assert all(w.ffn == f for w in spec.widths[0.0])


def test_deterministic_and_insensitive_to_last_bits():
    hp = _hp()
    c = _curves(hp, 32, seed=3)
    a = plan_rates_measured(hp, RATES, 32, c)
    assert plan_rates_measured(hp, RATES, 32, c.copy()) == a
    assert plan_rates_measured(hp, RATES, 32, c * (1 + 1e-12)) == a


def _exhaustive(curves, grid, unit, total, rate, lo):
    """Minimum total loss over all width choices (each layer >= lo) whose kept parameters are the
    nearest reachable to the rate's target (every step removes the same parameters here)."""
    L = curves.shape[0]
    steps_needed = round(rate * total / (unit * (grid[1] - grid[0])))
    best = None
    for combo in itertools.product(range(lo, grid.size), repeat=L):
        if sum(grid.size - 1 - j for j in combo) != steps_needed:
            continue
        loss = sum(curves[l, j] for l, j in enumerate(combo))
        best = loss if best is None or loss < best else best
    return best


@pytest.mark.parametrize("seed", range(4))
def test_convex_curves_solved_optimally(seed):
    """For convex curves (each further step costs at least as much as the last) the greedy on
    marginal loss is optimal: its loss equals an exhaustive search's at every rate."""
    hp = _hp(layers=3, f=128)  # grid 16..128 in steps of 16: 8 widths per layer, 512 combinations
    g = 16
    grid = mlp_grid(hp, g)
    c = _curves(hp, g, seed=seed, convex=True)
    spec = plan_rates_measured(hp, RATES, g, c)
    lo = int(np.searchsorted(grid, 0.2 * hp.intermediate_size - 1e-9))
    for r in RATES[1:]:
        got = sum(c[l, list(grid).index(w.ffn)] for l, w in enumerate(spec.widths[r]))
        best = _exhaustive(c, grid, unit_params(hp)[0], total_prunable_params(hp), r, lo)
        assert got == pytest.approx(best, rel=1e-5), r


def test_a_more_sensitive_layer_keeps_more_width():
    hp = _hp()
    c = _curves(hp, 32, seed=1)
    base = plan_rates_measured(hp, RATES, 32, c)
    for layer in range(hp.num_layers):
        c2 = c.copy()
        c2[layer] *= 20
        spec = plan_rates_measured(hp, RATES, 32, c2)
        more = [spec.widths[r][layer].ffn - base.widths[r][layer].ffn for r in RATES[1:]]
        assert all(m >= 0 for m in more) and any(m > 0 for m in more), (layer, more)
        # ... and the other layers pay for it: the budget is the same
        for r in RATES:
            assert abs(realised_rate(hp, spec.widths[r]) - realised_rate(hp, base.widths[r])) <= \
                unit_params(hp)[0] * 32 / total_prunable_params(hp)


def test_flat_stretch_after_a_steep_step_is_seen_through():
    """A layer whose first step is expensive but whose next steps are free is cheaper per
    parameter over the stretch than a layer with a steady cost: the look-ahead prunes it first."""
    hp = _hp(layers=2, f=128)
    g = 32  # grid 32, 64, 96, 128
    steep_then_flat = np.array([1.0, 1.0, 1.0, 0.0])  # 3 steps for 1.0
    steady = np.array([1.2, 0.8, 0.4, 0.0])  # 0.4 a step
    spec = plan_rates_measured(hp, (0, 0.2), g, np.stack([steady, steep_then_flat]), max_prune=0.75)
    ws = spec.widths[0.2]
    assert realised_rate(hp, ws) == pytest.approx(0.2, abs=unit_params(hp)[0] * g / total_prunable_params(hp) / 2)
    assert ws[1].ffn < ws[0].ffn  # the steep-then-flat layer went down, the steady one kept more


def test_bad_input_refused():
    hp = _hp()
    c = _curves(hp, 32)
    with pytest.raises(EdgeqError, match="shape"):
        plan_rates_measured(hp, RATES, 32, c[:, 1:])
    bad = c.copy()
    bad[0, 0] = np.nan
    with pytest.raises(EdgeqError, match="non-finite"):
        plan_rates_measured(hp, RATES, 32, bad)
    with pytest.raises(EdgeqError, match="MLP alone"):  # 0.7 of all prunable > 80 % of the MLP's
        plan_rates_measured(hp, (0, 0.7), 32, c)
    with pytest.raises(EdgeqError, match="granularity"):
        plan_rates_measured(hp, RATES, 0, c)

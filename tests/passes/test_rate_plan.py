import dataclasses

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.ir import Arch, HParams, LayerWidths, PruneSpec
from edgeq.passes.rate_plan import (MAX_LAYER_PRUNE, apply_prune_spec, check_rates, layer_keep_ratios,
                                    parse_rates, plan_rates, prunable_params, rate_tolerance, realised_rate,
                                    total_prunable_params)

TINY = HParams(arch=Arch.LLAMA, vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16, rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=512,
               tie_word_embeddings=False, attention_bias=False)
# SmolLM2-135M's shapes: 30 layers, hidden 576, ffn 1536, 9 / 3 heads, head_dim 64
SMOL = HParams(arch=Arch.LLAMA, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
               num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5, rms_norm_eps=1e-5,
               max_position_embeddings=8192, tie_word_embeddings=True, attention_bias=False)
# a deeper tiny-ish shape whose ffn is not a multiple of every granularity
ODD = dataclasses.replace(TINY, num_layers=7, intermediate_size=160, num_heads=6, num_kv_heads=2, head_dim=12)

RATES = (0.0, 0.1, 0.15, 0.25, 0.35, 0.5)


def _importance(n, seed=0):
    return np.random.RandomState(seed).uniform(0.02, 0.4, n)


def _check_spec(hp, spec, granularity):
    tol = rate_tolerance(hp, granularity)
    prev = None
    for r in spec.rates:
        ws = spec.widths[r]
        got = realised_rate(hp, ws)
        assert abs(got - r) <= tol, (r, got, tol)
        assert abs(got - r) <= tol / 2 + 1e-12  # what the greedy repair guarantees
        for w in ws:
            assert w.ffn % granularity == 0 or w.ffn == hp.intermediate_size
            assert w.qk_pairs % 2 == 0 or w.qk_pairs == hp.head_dim // 2
            assert w.v_dims % 2 == 0 or w.v_dims == hp.head_dim
            assert w.ffn >= min(granularity, hp.intermediate_size) and w.qk_pairs >= min(2, hp.head_dim // 2)
            assert w.v_dims >= 2
        if prev is not None:
            for a, b in zip(prev, ws):
                assert b.ffn <= a.ffn and b.qk_pairs <= a.qk_pairs and b.v_dims <= a.v_dims
        prev = ws
    assert spec.widths[0.0] == (LayerWidths(hp.intermediate_size, hp.head_dim // 2, hp.head_dim),) * hp.num_layers


@pytest.mark.parametrize("hp,granularities", [(TINY, (32, 64)), (SMOL, (32, 64, 128, 256)), (ODD, (32, 64))],
                         ids=["tiny", "smollm2", "odd"])
@pytest.mark.parametrize("mode", ["angular", "uniform"])
def test_plan_hits_requested_rate_within_one_step(hp, granularities, mode):
    imp = _importance(hp.num_layers) if mode == "angular" else None
    rates = RATES if hp is not TINY else RATES[:-1]
    for g in granularities:
        spec = plan_rates(hp, rates, granularity=g, importance=imp, mode=mode)
        assert spec.rates == rates and spec.granularity == g and spec.importance == mode
        _check_spec(hp, spec, g)


def test_smollm2_tolerance_is_one_mlp_step():
    # h * 3 * g / (L * h * (2 * D * (H + KV) + 3 * F))
    assert rate_tolerance(SMOL, 128) == pytest.approx(3 * 128 / (30 * (2 * 64 * 12 + 3 * 1536)))
    assert total_prunable_params(SMOL) == 30 * 576 * (2 * 64 * 12 + 3 * 1536)
    assert prunable_params(SMOL, LayerWidths(1536, 32, 64)) == 576 * (2 * 32 * 12 + 64 * 12 + 3 * 1536)


def test_angular_allocation_follows_importance_and_is_deterministic():
    imp = _importance(SMOL.num_layers, seed=3)
    a = plan_rates(SMOL, (0.25,), granularity=32, importance=imp)
    b = plan_rates(SMOL, (0.25,), granularity=32, importance=imp.copy())
    assert a == b
    ws = a.widths[0.25]
    most, least = int(np.argmax(imp)), int(np.argmin(imp))
    assert realised_rate(SMOL, [ws[most]] * 30) < realised_rate(SMOL, [ws[least]] * 30)


def test_keep_ratios_renormalised_after_clamp():
    imp = np.array([0.0, 0.0, 0.0, 0.5, 0.6, 0.7, 0.8, 0.9])  # three layers want almost everything pruned
    for rate in (0.1, 0.25, 0.35, 0.5, 0.7, MAX_LAYER_PRUNE):
        keep = layer_keep_ratios(imp, rate)
        phi = 1 - keep
        assert phi.mean() == pytest.approx(rate, abs=1e-12)
        assert phi.max() <= MAX_LAYER_PRUNE + 1e-12 and phi.min() >= 0
        assert np.all(np.diff(phi) <= 1e-12)  # more important -> pruned less
    # UniQL's unrenormalised clamp would undershoot here
    p = np.exp(-imp / 0.1) / np.exp(-imp / 0.1).sum()
    assert np.minimum(len(imp) * 0.35 * p, MAX_LAYER_PRUNE).mean() < 0.34
    w = np.arange(1.0, 9.0)  # parameter-weighted mean
    phi = 1 - layer_keep_ratios(imp, 0.3, weights=w)
    assert (phi * w).sum() / w.sum() == pytest.approx(0.3, abs=1e-12)
    np.testing.assert_array_equal(layer_keep_ratios(None, 0.3, mode="uniform", weights=np.ones(4)), 0.7)
    # softmax weights that underflow in float64 still take their share (solved in log space)
    np.testing.assert_allclose(layer_keep_ratios(np.array([0, 0, 0, 100.0]), 0.7), [0.2, 0.2, 0.2, 0.6])


def test_keep_ratios_monotone_in_rate():
    imp = _importance(12, seed=5)
    prev = np.ones(12)
    for r in np.linspace(0, MAX_LAYER_PRUNE, 17):
        k = layer_keep_ratios(imp, r)
        assert np.all(k <= prev + 1e-12)
        prev = k


@pytest.mark.parametrize("rates,msg", [
    ((-0.1,), ">= 0"), ((1.0,), "< 1"), ((1.5,), "< 1"), ((0.95,), "maximum 0.9"),
    ((0.1, 0.25, 0.1), "given twice"), ((float("nan"),), "finite"), (("0.1",), "number")])
def test_bad_rates_refused(rates, msg):
    with pytest.raises(EdgeqError, match=msg):
        plan_rates(TINY, rates, mode="uniform")


def test_unreachable_rates_refused():
    with pytest.raises(EdgeqError, match="per-layer pruning cap"):
        plan_rates(SMOL, (0.85,), mode="uniform")
    with pytest.raises(EdgeqError, match="cannot be reached"):  # tiny: min widths of one step
        plan_rates(TINY, (0.8,), granularity=64, mode="uniform")
    with pytest.raises(EdgeqError, match="needs per-layer importance"):
        plan_rates(TINY, (0.25,))
    with pytest.raises(EdgeqError, match="expected 2 per-layer scores"):
        plan_rates(TINY, (0.25,), importance=np.ones(3))
    with pytest.raises(EdgeqError, match="granularity"):
        plan_rates(TINY, (0.25,), granularity=0, mode="uniform")


def test_parse_rates():
    assert parse_rates("0,0.15,0.25") == (0.0, 0.15, 0.25)
    assert parse_rates(" 0.35, 0.15 ") == (0.0, 0.15, 0.35)  # sorted, 0 always carried
    assert check_rates([0.25, 0]) == (0.0, 0.25)
    for bad, msg in (("", "got nothing"), ("0,,0.1", "empty entry"), ("0,abc", "'abc' is not a number"),
                     ("0,-0.1", ">= 0"), ("0.2,0.2", "twice"), ("0.91", "maximum")):
        with pytest.raises(EdgeqError, match=msg):
            parse_rates(bad)


def test_apply_prune_spec(tiny_llama):
    from edgeq.frontend import load_model

    ir = load_model(tiny_llama)
    spec = plan_rates(ir, (0, 0.25), mode="uniform")
    out = apply_prune_spec(ir, spec)
    assert out.prune is spec and ir.prune is None and out.history[-1].name == "rate_plan"
    assert PruneSpec.from_json(spec.to_json()) == spec
    bad = dataclasses.replace(spec, widths={0.0: spec.widths[0.0], 0.25: (LayerWidths(256, 4, 8),) * 2})
    with pytest.raises(EdgeqError, match="out of range"):
        apply_prune_spec(ir, bad)
    with pytest.raises(EdgeqError, match="expected widths for 30 layers, got 2"):
        realised_rate(SMOL, spec.widths[0.25])

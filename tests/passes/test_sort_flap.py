"""sort_flap: FLAP's fluctuation metric against the variance of the raw activations (the reference
runtime's taps) times the weight columns' norms; the sort (exact at rate 0, descending, Q/K pairs
as UniQL's sort_qk); FLAP's allocation across layers (one threshold on standardised scores,
nested prefixes, on budget); and a pruned rate of a FLAP build equal to the same model with those
channels' contributions removed and their mean added back as a bias."""
import dataclasses

import numpy as np
import pytest

from activation_taps import tapped
from edgeq import pipeline
from edgeq.build import BuildOptions, compress_steps
from edgeq.calibrate import alpaca_token_sequences
from edgeq.errors import EdgeqError
from edgeq.frontend import load_adapter, load_model
from edgeq.ir import Role
from edgeq.passes import run_pass
from edgeq.passes.prune_alloc import fluctuation_curves, mlp_grid, plan_rates_measured
from edgeq.passes.rate_plan import rate_tolerance, realised_rate
from edgeq.passes.sort_flap import FlapSortConfig, mlp_fluctuation, sorted_mlp_scores, vo_fluctuation
from edgeq.passes.sort_qk import SortQKConfig
from edgeq.targets import load_target
from edgeq.tolerances import SORT_EXACT_MAX_REL
from runtimes.reference import ReferenceSession

# E[x^2] - E[x]^2 from the calibration's float64 sums vs the variance of the same float32
# activations tapped here: float64 summation order (and that cancellation) only
FLUCT_MATCH_REL = 1e-6
# a rate's logits vs the model with the dropped columns zeroed and their mean contribution as the
# down_proj bias: float32 re-association of the sliced vs zero-padded products, float32 means
PRUNED_EQ_REL = 1e-4


def _seqs(ir):  # the sequences the passes' ``model`` fixture calibrates on (tests/passes/conftest.py)
    return alpaca_token_sequences(ir.tokenizer, n_samples=4, seq_len=32)


def _oracle(ir, seqs):
    """Per layer, (MLP channel scores, V/O component scores per KV group) from raw activations."""
    hp = ir.hparams
    H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
    out = []
    for li, a in tapped(ir, seqs).items():
        wd = ir.linear(li, Role.DOWN).weight.astype(np.float64)
        wo = ir.linear(li, Role.O).weight.astype(np.float64)
        mlp = a["down_in"].var(axis=0) * (wd ** 2).sum(axis=0)
        vo = (a["o_in"].var(axis=0) * (wo ** 2).sum(axis=0)).reshape(KV, H // KV, D).sum(axis=1)
        out.append((mlp, vo))
    return out


def test_metric_is_the_variance_times_the_column_norm(model):
    ir, stats = model
    for li, (mlp, vo) in enumerate(_oracle(ir, _seqs(ir))):
        got = mlp_fluctuation(ir, stats, li)
        assert np.abs(got - mlp).max() <= FLUCT_MATCH_REL * mlp.max(), li
        got_vo = vo_fluctuation(ir, stats, li)
        assert got_vo.shape == vo.shape
        assert np.abs(got_vo - vo).max() <= FLUCT_MATCH_REL * vo.max(), li
        # not the plain energy: the mean is taken out (the metric of an input replaced by its mean)
        energy = np.diag(stats.layers[li].mlp_zz) * (ir.linear(li, Role.DOWN).weight.astype(np.float64) ** 2).sum(0)
        assert np.abs(energy - mlp).max() > 1e-3 * mlp.max()


def test_sort_is_exact_and_puts_the_highest_fluctuation_first(model, rel_err):
    ir, stats = model
    out = run_pass(ir, FlapSortConfig(), stats)
    assert rel_err(ir, out) <= SORT_EXACT_MAX_REL
    assert [r.name for r in out.history] == ["sort_flap", "sort_qk"]
    qk = run_pass(ir, SortQKConfig(), stats)  # Q/K pairs: UniQL's order, rows and rope_index alike
    assert set(out.rope_index) == set(qk.rope_index)
    for li in qk.rope_index:
        np.testing.assert_array_equal(out.rope_index[li], qk.rope_index[li])
    for role in (Role.Q, Role.K):
        for li in range(ir.hparams.num_layers):
            np.testing.assert_array_equal(out.linear(li, role).weight, qk.linear(li, role).weight)
    sorted_scores = sorted_mlp_scores(ir, stats)
    moved = 0
    for li, (mlp, vo) in enumerate(_oracle(out, _seqs(ir))):  # the sorted model's own activations
        assert np.all(np.diff(mlp) <= FLUCT_MATCH_REL * mlp.max()), li
        assert np.all(np.diff(vo, axis=1) <= FLUCT_MATCH_REL * vo.max()), li
        # the scores the fluctuation allocation reads are the sorted channels', in their new order
        assert np.abs(sorted_scores[li] - mlp).max() <= FLUCT_MATCH_REL * mlp.max(), li
        moved += not np.array_equal(out.linear(li, Role.DOWN).weight, ir.linear(li, Role.DOWN).weight)
        moved += not np.array_equal(out.linear(li, Role.V).weight, ir.linear(li, Role.V).weight)
    assert moved == 2 * ir.hparams.num_layers


def test_lora_branches_move_with_the_channels(tiny_llama, tiny_llama_lora, rel_err, calibrate_tiny):
    ir = load_adapter(load_model(tiny_llama), tiny_llama_lora)  # a separate low-rank branch
    out = run_pass(ir, FlapSortConfig(), calibrate_tiny(ir))
    assert rel_err(ir, out) <= SORT_EXACT_MAX_REL
    with pytest.raises(EdgeqError, match="calibration statistics"):
        run_pass(ir, FlapSortConfig(), None)


def _random_scores(L, F, seed=0):
    """Per layer, descending positive scores of different spreads (a log-normal per layer)."""
    rng = np.random.default_rng(seed)
    return [np.sort(np.exp(rng.normal(0, 0.3 + 0.4 * l, F)))[::-1] * (10.0 ** l) for l in range(L)]


def test_allocation_is_one_threshold_on_standardised_scores(tiny_llama):
    hp = dataclasses.replace(load_model(tiny_llama).hparams, num_layers=6)
    gran, rates = 8, (0.0, 0.1, 0.25, 0.4)
    grid = mlp_grid(hp, gran)
    scores = _random_scores(hp.num_layers, hp.intermediate_size)
    spec = plan_rates_measured(hp, rates, gran, fluctuation_curves(scores, grid), importance="fluctuation")
    assert spec.importance == "fluctuation" and spec.dims == "mlp"
    # the oracle: FLAP's standardisation, then each grid block's mean standardised score
    z = [(s - s.mean()) / s.std(ddof=1) for s in scores]
    lo = int(np.searchsorted(grid, 0.2 * hp.intermediate_size - 1e-9))  # the 80 % per-layer cap
    prev = None
    for r in rates:
        ws = spec.at(r)
        assert abs(realised_rate(hp, ws) - r) <= rate_tolerance(hp, gran) / 2 + 1e-12, r
        assert all(w.qk_pairs == hp.head_dim // 2 and w.v_dims == hp.head_dim for w in ws)
        if prev is not None:  # nested: every rate a prefix of the one sorted model
            assert all(a.ffn <= b.ffn for a, b in zip(ws, prev)), r
        prev = ws
        removed, next_up = [], []
        for l, w in enumerate(ws):
            j = int(np.searchsorted(grid, w.ffn))
            assert grid[j] == w.ffn and j >= lo
            removed += [z[l][grid[k - 1]:grid[k]].mean() for k in range(j + 1, grid.size)]
            if j > lo:  # the block this layer would drop next
                next_up.append(z[l][grid[j - 1]:grid[j]].mean())
        if removed and next_up:  # one threshold across layers (to the curves' 6 significant digits)
            assert max(removed) <= min(next_up) + 1e-3, r
    # standardised per layer: scaling one layer's scores changes nothing
    scaled = [s * (1e4 if l == 2 else 1.0) for l, s in enumerate(scores)]
    again = plan_rates_measured(hp, rates, gran, fluctuation_curves(scaled, grid), importance="fluctuation")
    assert again.widths == spec.widths
    # and the widths are not uniform: the layers' score distributions differ
    assert len({w.ffn for w in spec.at(0.4)}) > 1


def test_allocation_checks_its_scores(tiny_llama):
    hp = load_model(tiny_llama).hparams
    grid = mlp_grid(hp, 32)
    good = _random_scores(hp.num_layers, hp.intermediate_size)
    with pytest.raises(EdgeqError, match="descending"):
        fluctuation_curves([good[0][::-1], good[1]], grid)
    with pytest.raises(EdgeqError, match="channel scores"):
        fluctuation_curves([good[0][:-1], good[1]], grid)
    flat = fluctuation_curves([np.ones(hp.intermediate_size), good[1]], grid)
    assert not flat[0].any()


@pytest.fixture(scope="module")
def flap_build(tiny_llama):
    ir = load_model(tiny_llama)
    opts = BuildOptions(model=tiny_llama, out=tiny_llama / "unused", prune_rates=(0.0, 0.25, 0.5), sort="flap",
                        importance="fluctuation", prune_dims="mlp", prune_bias=True, calib_samples=4, calib_len=64)
    target = load_target("cpu-avx2")
    ctx = pipeline.run(compress_steps(opts, target),
                       pipeline.BuildContext(opts=opts, target=target, log=lambda m: None, ir=ir))
    return ctx.ir, ctx.calib_seqs


def test_pruned_rate_equals_the_model_without_those_channels_plus_their_mean(flap_build):
    ir, seqs = flap_build
    assert ir.prune.importance == "fluctuation" and "sort_flap" in [r.name for r in ir.history]
    z = {li: a["down_in"] for li, a in tapped(ir, seqs, names=("down_in",)).items()}
    ids = np.random.RandomState(0).randint(0, ir.hparams.vocab_size, 24).tolist()
    sess = ReferenceSession(ir)
    full = sess.logits(ids)
    for r in ir.prune.rates[1:]:
        lins = dict(ir.linears)
        for li, w in enumerate(ir.prune.at(r)):
            down = ir.linear(li, Role.DOWN)
            wd = down.weight.astype(np.float64)
            bias = wd[:, w.ffn:] @ z[li][:, w.ffn:].mean(axis=0)  # the dropped channels' mean contribution
            cut = down.weight.copy()
            cut[:, w.ffn:] = 0.0
            lins[down.name] = dataclasses.replace(down, weight=cut, bias=bias.astype(np.float32))
        removed = ReferenceSession(ir.replace(linears=lins, prune=None, prune_means={})).logits(ids)
        sess.set_prune_rate(r)
        got = sess.logits(ids)
        scale = np.abs(removed).max()
        assert np.abs(got - removed).max() <= PRUNED_EQ_REL * scale, r
        assert np.abs(got - full).max() > 100 * PRUNED_EQ_REL * scale, r  # the rate really prunes

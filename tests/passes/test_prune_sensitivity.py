"""Measured MLP loss-vs-width curves (edgeq.passes.prune_sensitivity) on tiny models, against
independent computations: the layer output errors against the numpy calibration's statistics,
the measured KLs against the reference runtime running the same pruned model, and a layer made
more sensitive gets more width from the allocation built on the curves."""
import dataclasses

import numpy as np
import pytest

from edgeq.calibrate import alpaca_token_sequences, calibrate
from edgeq.frontend import load_model
from edgeq.goldens import log_softmax
from edgeq.ir import LayerWidths, PruneSpec, Role, full_widths, linear_name
from edgeq.passes import run_pass
from edgeq.passes.prune_alloc import mlp_grid, plan_rates_measured
from edgeq.passes.prune_bias import with_prune_means
from edgeq.passes.prune_sensitivity import interpolate_gain, mlp_loss_curves, probe_indices
from edgeq.passes.uniql import UniQLSortConfig
from runtimes.reference import ReferenceSession

G = 16  # MLP grid step on the tiny models (d_ff 128: 8 widths)
RATES = (0.0, 0.1, 0.2, 0.3)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def sorted_model(request):
    """(sorted tiny model carrying the calibration's means, its statistics, the sequences)."""
    ir = load_model(request.getfixturevalue(f"tiny_{request.param}"))
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=3, seq_len=32)
    stats = calibrate(ir, seqs, progress=False)
    ir = with_prune_means(ir, [layer.means() for layer in stats.layers])
    ir = run_pass(ir, UniQLSortConfig(), stats)
    return ir, calibrate(ir, seqs, progress=False), seqs  # statistics in the sorted order


def _trace_curve(ir, stats, layer, grid, centred):
    """err(f) = tr(W[:, f:] S[f:, f:] W[:, f:]^T), S the covariance (centred) or second moment
    of ffn_down's input from the numpy calibration forward."""
    W = np.asarray(ir.linears[linear_name(layer, Role.DOWN)].weight, dtype=np.float64)
    st = stats.layers[layer]
    S = st.mlp_zz - (np.outer(st.z_mean, st.z_mean) if centred else 0)
    return np.array([np.trace(W[:, f:] @ S[f:, f:] @ W[:, f:].T) for f in grid])


@pytest.mark.parametrize("means", [True, False])
def test_curve_is_the_measured_kl_at_probes_and_the_calibration_error_between(sorted_model, means):
    ir, stats, seqs = sorted_model
    if not means:
        ir = ir.replace(prune_means={})
    grid = mlp_grid(ir.hparams, G)
    curves, rec = mlp_loss_curves(ir, seqs, G)
    probes = probe_indices(grid, ir.hparams.intermediate_size)
    assert rec["probe_widths"] == [int(grid[j]) for j in probes] == [32, 64, 96]
    assert np.all(curves[:, -1] == 0)
    full = full_widths(ir.hparams)
    ref = ReferenceSession(ir)
    ref_lp = [log_softmax(ref.logits(s).astype(np.float64)) for s in seqs]
    for layer in range(ir.hparams.num_layers):
        err = _trace_curve(ir, stats, layer, grid, centred=means)
        kl_ref = []
        for n, j in enumerate(probes):
            # the reference runtime, only this layer pruned (with the compensation when it has means)
            ws = [full] * ir.hparams.num_layers
            ws[layer] = LayerWidths(ffn=int(grid[j]), qk_pairs=full.qk_pairs, v_dims=full.v_dims)
            spec = PruneSpec(rates=(0.0, 0.5), widths={0.0: (full,) * len(ws), 0.5: tuple(ws)}, granularity=G,
                             importance="measured", dims="mlp")
            s = ReferenceSession(ir.replace(prune=spec))
            s.set_prune_rate(0.5)
            kl = np.mean([(np.exp(a) * (a - log_softmax(s.logits(q).astype(np.float64)))).sum(-1).mean()
                          for a, q in zip(ref_lp, seqs)])
            kl_ref.append(kl)
            assert rec["probe_kl"][layer][n] == pytest.approx(kl, rel=2e-3, abs=1e-7), (layer, j)
            assert curves[layer, j] == pytest.approx(kl, rel=2e-3, abs=1e-7)
        # between probes: the calibration's error scaled by the interpolated gain KL / err
        gain = interpolate_gain(grid, probes, [k / err[j] for k, j in zip(kl_ref, probes)])
        np.testing.assert_allclose(curves[layer, :-1], (gain * err)[:-1], rtol=5e-3)


def test_a_layer_made_sensitive_gets_more_width(tiny_llama):
    """Scaling one layer's ffn_down up makes its pruning error, and the KL it causes, larger:
    the allocation measured on the changed model keeps more of that layer's channels."""
    ir = load_model(tiny_llama)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=3, seq_len=32)
    sorted_ir = run_pass(ir, UniQLSortConfig(), calibrate(ir, seqs, progress=False))
    base = plan_rates_measured(sorted_ir, RATES, G, mlp_loss_curves(sorted_ir, seqs, G)[0])
    for layer in range(ir.hparams.num_layers):
        name = linear_name(layer, Role.DOWN)
        lin = sorted_ir.linears[name]
        loud = sorted_ir.replace(linears={**sorted_ir.linears, name: dataclasses.replace(lin, weight=lin.weight * 4)})
        spec = plan_rates_measured(loud, RATES, G, mlp_loss_curves(loud, seqs, G)[0])
        more = [spec.widths[r][layer].ffn - base.widths[r][layer].ffn for r in RATES[1:]]
        assert all(m >= 0 for m in more) and any(m > 0 for m in more), (layer, more)


def test_deterministic(sorted_model):
    ir, _, seqs = sorted_model
    a, ra = mlp_loss_curves(ir, seqs, G)
    b, rb = mlp_loss_curves(ir, seqs, G)
    assert ra == rb
    assert plan_rates_measured(ir, RATES, G, a) == plan_rates_measured(ir, RATES, G, b)

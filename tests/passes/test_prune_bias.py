"""Bias compensation (edgeq.passes.prune_bias): the per-rate vectors are the pruned inputs' mean
contribution (checked against an independent numpy computation from the runtime's own taps on
the sorted model), they lower the error a rate makes on the calibration data, every runtime path
(session, streamed, natural-order lowering formula) agrees, and ``--prune-dims mlp`` keeps the
parameter rate."""
import numpy as np
import pytest

from activation_taps import tapped
from edgeq import pipeline
from edgeq.build import BuildOptions, compress_steps
from edgeq.errors import EdgeqError
from edgeq.frontend import load_model
from edgeq.ir import Role
from edgeq.passes.prune_bias import rate_bias, rate_bias_tables, with_prune_means
from edgeq.passes.rate_plan import plan_rates, realised_rate, rate_tolerance
from edgeq.targets import load_target
from runtimes.reference import ReferenceSession, streamed_logits

RATES = (0.0, 0.25, 0.5)
CALIB = dict(calib_samples=4, calib_len=64)
# means carried through the sorts (float64 permutation / rotation of float64 sums) vs the same means
# tapped from the sorted float32 model: float32 activation rounding only
MEAN_MATCH_MAX_REL = 1e-4
# the runtime's layout-order float64 sums vs the lowerings' natural-order ones, both rounded to float32
PATHS_MAX_REL = 1e-5


def _compress(model_dir, sort="uniql", **kw):
    ir = load_model(model_dir)
    opts = BuildOptions(model=model_dir, out=model_dir / "unused", prune_rates=RATES, sort=sort, **CALIB, **kw)
    target = load_target("cpu-avx2")
    ctx = pipeline.run(compress_steps(opts, target), pipeline.BuildContext(opts=opts, target=target, log=lambda m: None,
                                                                           ir=ir))
    return ctx.ir, ctx.calib_seqs


@pytest.fixture(scope="module", params=["llama-uniql", "qwen2-uniql", "llama-naive"])
def biased(request, tiny_llama, tiny_qwen2):
    fam, sort = request.param.split("-")
    ir, seqs = _compress(tiny_llama if fam == "llama" else tiny_qwen2, sort=sort, prune_bias=True)
    return ir, seqs


def test_bias_is_the_pruned_inputs_mean_contribution(biased):
    ir, seqs = biased
    hp = ir.hparams
    H, D, F = hp.num_heads, hp.head_dim, hp.intermediate_size
    acts = tapped(ir, seqs)
    assert ir.history[-1].name != "prune_bias" and "prune_bias" in [r.name for r in ir.history]
    nonzero = 0
    for r in RATES:
        for li, w in enumerate(ir.prune.widths[r]):
            z, o = acts[li]["down_in"], acts[li]["o_in"]
            # independent: mean over tokens of what the dropped inputs would have added
            wd = ir.linear(li, Role.DOWN).weight.astype(np.float64)
            want_d = (z[:, w.ffn:] @ wd[:, w.ffn:].T).mean(0)
            drop = np.concatenate([np.arange(h * D + w.v_dims, (h + 1) * D) for h in range(H)]).astype(int)
            want_o = (o[:, drop] @ ir.linear(li, Role.O).weight.astype(np.float64)[:, drop].T).mean(0)
            got_o, got_d = rate_bias(ir, li, w)
            scale = max(np.abs(want_d).max(), np.abs(want_o).max(), 1e-6)
            assert np.abs(got_d - want_d).max() <= MEAN_MATCH_MAX_REL * scale, (r, li)
            assert np.abs(got_o - want_o).max() <= MEAN_MATCH_MAX_REL * scale, (r, li)
            if r == 0.0:
                assert not got_d.any() and not got_o.any()
            if w.ffn < F:
                assert np.abs(got_d).max() > 0
                nonzero += 1
    assert nonzero > 0


def test_bias_lowers_each_layers_error_on_the_calibration_data(biased):
    """Replacing the dropped inputs by their mean minimises the mean squared output error over the
    data the mean came from: E|W(z - m)|^2 = E|Wz|^2 - |Wm|^2, strictly lower whenever Wm != 0."""
    ir, seqs = biased
    acts = tapped(ir, seqs)
    for r in RATES[1:]:
        for li, w in enumerate(ir.prune.widths[r]):
            z = acts[li]["down_in"]
            wd = ir.linear(li, Role.DOWN).weight.astype(np.float64)
            dropped = z[:, w.ffn:] @ wd[:, w.ffn:].T  # full output minus the pruned layer's output
            _, b = rate_bias(ir, li, w)
            if w.ffn < ir.hparams.intermediate_size:
                err_none = np.mean(np.sum(dropped ** 2, axis=1))
                err_bias = np.mean(np.sum((dropped - b) ** 2, axis=1))
                assert err_bias < err_none, (r, li)


def test_runtime_paths_agree_and_rate_0_is_untouched(biased):
    ir, seqs = biased
    plain = ir.replace(prune_means={})
    s, p = ReferenceSession(ir), ReferenceSession(plain)
    ids = seqs[0][:24]
    tables = rate_bias_tables(ir)
    for r in RATES:
        s.set_prune_rate(r)
        p.set_prune_rate(r)
        a, b = s.logits(ids), p.logits(ids)
        st = streamed_logits(ir, [ids], r, dtype=np.float32)[0]
        assert np.abs(st - a).max() <= 1e-4 * np.abs(a).max(), r
        if r == 0.0:
            assert np.array_equal(a, b)  # nothing pruned, nothing added
        else:
            assert np.abs(a - b).max() > 1e-4  # the bias really is applied
        # the runtime computes the vectors in its own layout; the lowerings use rate_bias_tables
        for li, L in enumerate(s.layers):
            rb = s.biases[li]
            want = tables[r][li]
            if rb is None:
                assert not want.any()
            else:
                assert np.abs(np.stack(rb) - want).max() <= PATHS_MAX_REL * max(np.abs(want).max(), 1e-6)


def test_means_carried_through_the_sorts_equal_measured_ones(tiny_llama):
    """--prune-bias takes the calibration's means and lets the sorts carry them; measuring them again
    on the sorted model (``source="measure"``, what follows a recovery) gives the same means."""
    from edgeq.calibrate import collect_means

    ir, seqs = _compress(tiny_llama, prune_bias=True)
    measured = collect_means(ir, seqs, progress=False)
    for li, m in ir.prune_means.items():
        for got, want in ((m.down, measured[li].down), (m.o, measured[li].o)):
            assert np.abs(np.asarray(got) - want).max() <= MEAN_MATCH_MAX_REL * np.abs(want).max()


def test_mlp_only_plan_keeps_the_rate_and_attention(tiny_llama):
    ir = load_model(tiny_llama)
    hp = ir.hparams
    spec = plan_rates(ir, RATES, granularity=32, importance=np.array([0.1, 0.3]), dims="mlp")
    assert spec.dims == "mlp" and spec.to_json()["dims"] == "mlp"
    for r in RATES:
        ws = spec.at(r)
        assert all(w.qk_pairs == hp.head_dim // 2 and w.v_dims == hp.head_dim for w in ws)
        assert abs(realised_rate(hp, ws) - r) <= rate_tolerance(hp, 32)
    assert plan_rates(ir, RATES, granularity=32, importance=np.array([0.1, 0.3])).to_json().get("dims") is None
    with pytest.raises(EdgeqError, match="MLP alone"):
        plan_rates(ir, (0.0, 0.7), granularity=32, importance=np.array([0.1, 0.3]), dims="mlp")
    with pytest.raises(EdgeqError, match="pruned dimensions"):
        plan_rates(ir, RATES, granularity=32, dims="qk")


def test_with_prune_means_checks_its_input(tiny_llama):
    from edgeq.ir import LayerMeans

    ir = load_model(tiny_llama)
    hp = ir.hparams
    with pytest.raises(EdgeqError, match="layers"):
        with_prune_means(ir, [])
    bad = [LayerMeans(down=np.zeros(3), o=np.zeros(hp.num_heads * hp.head_dim))] * hp.num_layers
    with pytest.raises(EdgeqError, match="prune_means"):
        with_prune_means(ir, bad)

"""sort_mlp: ridge-leverage MLP channel sort (exact at rate 0); the pass registry."""
import dataclasses

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.frontend import load_adapter, load_model
from edgeq.ir import Role
from edgeq.passes import register, registered, run_pass
from edgeq.passes.sort_mlp import SortMLPConfig, mlp_scores, sort_order
from edgeq.tolerances import SORT_EXACT_MAX_REL


def test_exact_at_rate_zero(model, rel_err):
    ir, stats = model
    out = run_pass(ir, SortMLPConfig(), stats)
    assert rel_err(ir, out) <= SORT_EXACT_MAX_REL
    assert [r.name for r in out.history] == ["sort_mlp"]
    assert out.history[-1].options["lam"] == 1.0 and out.history[-1].options["calibration"]["n_samples"] == 4


def test_really_permutes_by_descending_score(model, calibrate_tiny):
    ir, stats = model
    before = {k: v.weight.copy() for k, v in ir.linears.items()}
    out = run_pass(ir, SortMLPConfig(), stats)
    for i in range(ir.hparams.num_layers):
        s = mlp_scores(stats.layers[i].mlp_zz)
        perm = sort_order(s)
        assert not np.array_equal(perm, np.arange(perm.size))
        assert np.all(np.diff(s[perm]) <= 0)
        np.testing.assert_array_equal(out.linear(i, Role.GATE).weight, ir.linear(i, Role.GATE).weight[perm])
        np.testing.assert_array_equal(out.linear(i, Role.UP).weight, ir.linear(i, Role.UP).weight[perm])
        np.testing.assert_array_equal(out.linear(i, Role.DOWN).weight, ir.linear(i, Role.DOWN).weight[:, perm])
    for k, w in before.items():  # input untouched
        np.testing.assert_array_equal(ir.linears[k].weight, w)
    # recalibrated, the sorted model's channels are already in score order
    again = calibrate_tiny(out)
    for L in again.layers:
        s = mlp_scores(L.mlp_zz)
        assert np.all(np.diff(s) <= 1e-9 * s.max())


def test_lambda_scaling():
    rng = np.random.RandomState(0)
    z = rng.randn(500, 24) * rng.rand(24) * 0.1
    C = z.T @ z / 500
    rel = mlp_scores(C, relative=True)
    np.testing.assert_allclose(rel, mlp_scores(1000 * C, relative=True), rtol=1e-9)  # relative ridge: scale-free
    assert np.all((rel > 0) & (rel < 1))
    s = mlp_scores(C)  # default: UniQL's absolute lam = 1; on small activations ...
    np.testing.assert_allclose(s, np.diag(C) / (1 + np.diag(C)), rtol=0.05)  # ... ~ diag(C) (energy)
    assert not np.allclose(mlp_scores(1000 * C), 1000 * s, rtol=0.05)  # ... and not scale-free
    with pytest.raises(EdgeqError, match="lam"):
        mlp_scores(C, lam=0.0)


def test_lora_branches_are_permuted_consistently(tiny_llama, tiny_llama_lora, rel_err, calibrate_tiny):
    ir = load_adapter(load_model(tiny_llama), tiny_llama_lora)
    out = run_pass(ir, SortMLPConfig(), calibrate_tiny(ir))
    assert out.linear(0, Role.DOWN).low_rank  # kept as a branch, not merged
    assert rel_err(ir, out) <= SORT_EXACT_MAX_REL
    assert rel_err(ir.without_low_rank(), out.without_low_rank()) <= SORT_EXACT_MAX_REL


def test_registry_rules(model):
    ir, stats = model
    assert SortMLPConfig in registered()
    with pytest.raises(EdgeqError, match="already registered"):
        register(SortMLPConfig)(lambda ir, c, s: ir)

    @dataclasses.dataclass
    class NotFrozen:
        pass

    with pytest.raises(EdgeqError, match="frozen"):
        register(NotFrozen)

    @dataclasses.dataclass(frozen=True)
    class Unknown:
        pass

    with pytest.raises(EdgeqError, match="no pass registered"):
        run_pass(ir, Unknown())
    with pytest.raises(EdgeqError, match="needs calibration"):
        run_pass(ir, SortMLPConfig())


def test_stats_must_fit_and_be_fresh(model):
    ir, stats = model
    out = run_pass(ir, SortMLPConfig(), stats)
    with pytest.raises(EdgeqError, match="recalibrate"):  # stats predate the first sort
        run_pass(out, SortMLPConfig(), stats)
    bad = dataclasses.replace(stats, layers=stats.layers[:1])
    with pytest.raises(EdgeqError, match="statistics for 1 layers"):
        run_pass(ir, SortMLPConfig(), bad)
    L0 = dataclasses.replace(stats.layers[0], mlp_zz=np.zeros((3, 3)))
    with pytest.raises(EdgeqError, match="expected shape"):
        run_pass(ir, SortMLPConfig(), dataclasses.replace(stats, layers=(L0,) + stats.layers[1:]))


def test_cholesky_scores_equal_the_eigendecomposition(monkeypatch):
    """Wide MLPs take the Cholesky form: same scores (to rounding) and the same order as eigh."""
    from edgeq.passes import sort_mlp as sm

    rng = np.random.default_rng(7)
    X = rng.standard_normal((300, 200)) * rng.uniform(0.1, 3.0, 200)
    C = X.T @ X / 300
    C[:, 5] = C[5, :] = 0.0  # a dead channel
    for lam, rel in ((1.0, False), (0.05, True)):
        want = sm.mlp_scores(C, lam, rel)
        monkeypatch.setattr(sm, "EIGH_MAX", 16)
        got = sm.mlp_scores(C, lam, rel)
        monkeypatch.setattr(sm, "EIGH_MAX", 4096)
        np.testing.assert_allclose(got, want, atol=1e-12)
        np.testing.assert_array_equal(sm.sort_order(got), sm.sort_order(want))


def test_layers_sorted_on_several_threads_give_the_same_model(model, monkeypatch):
    # the sort's per-layer work on worker threads (edgeq.streaming.layer_workers): the same IR, bit for bit
    import threading
    import time

    import edgeq.passes.sort_mlp as sm
    from edgeq.streaming import allow_layer_workers

    ir, stats = model
    seq = run_pass(ir, SortMLPConfig(), stats)
    threads, real = set(), sm.mlp_scores
    monkeypatch.setattr(sm, "mlp_scores", lambda *a: (threads.add(threading.get_ident()), time.sleep(0.05), real(*a))[2])
    with allow_layer_workers(3):
        par = run_pass(ir, SortMLPConfig(), stats)
    assert threading.get_ident() not in threads and len(threads) >= 2  # really on worker threads (each call kept busy 50 ms, so a pool does not reuse one idle thread)
    for name, lin in seq.linears.items():
        assert np.array_equal(lin.weight, par.linears[name].weight), name
    assert seq.history[-1] == par.history[-1]

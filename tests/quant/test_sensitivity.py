"""The planner's sensitivity estimates: the second-order Fisher estimate of every tensor at once
against the exact KL of replacing that tensor (a tail re-run of the torch forward) on the tiny
model, and both probes' plans."""
from __future__ import annotations

import numpy as np
import pytest

from edgeq.ir import Role

ROLES = (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)


@pytest.fixture(scope="module")
def probe_and_deltas(tiny_llama):
    from edgeq.frontend import load_model
    from edgeq.quant.sensitivity import KLProbe

    ir = load_model(tiny_llama)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, ir.hparams.vocab_size, 32)) for _ in range(4)]
    probe = KLProbe(ir, seqs, threads=1)
    deltas = {}
    for i in range(ir.hparams.num_layers):
        for r in ROLES:
            w = np.asarray(ir.linear(i, r).weight)
            # a small perturbation (quantization-noise sized): the second-order regime
            deltas[(i, r)] = (rng.standard_normal(w.shape) * 0.05 * np.abs(w).mean()).astype(np.float32)
    return ir, probe, deltas


def test_fisher_estimate_matches_the_exact_kl_of_each_tensor(probe_and_deltas):
    ir, probe, deltas = probe_and_deltas
    est = probe.fisher_kl(deltas, samples=32)
    exact = {k: probe.linear_kl(k[0], k[1], np.asarray(ir.linear(*k).weight) - d) for k, d in deltas.items()}
    ratios = np.array([est[k] / exact[k] for k in deltas])
    # Monte Carlo over 32 label samples x 4 sequences: ~15 % noise per tensor
    assert np.all((ratios > 0.6) & (ratios < 1.6)), ratios
    assert abs(sum(est.values()) / sum(exact.values()) - 1) < 0.2
    # it ranks the tensors as the exact KL does (V/O/MLP matter ~10-100x more than Q/K here)
    ks = list(deltas)
    order_e = np.argsort(np.argsort([exact[k] for k in ks]))
    order_f = np.argsort(np.argsort([est[k] for k in ks]))
    assert np.corrcoef(order_e, order_f)[0, 1] > 0.9


def test_fisher_estimate_is_zero_without_a_perturbation_and_deterministic(probe_and_deltas):
    ir, probe, deltas = probe_and_deltas
    zero = probe.fisher_kl({k: np.zeros_like(d) for k, d in deltas.items()}, samples=2)
    assert all(v == 0.0 for v in zero.values())
    few = dict(list(deltas.items())[:3])
    assert probe.fisher_kl(few, samples=4) == probe.fisher_kl(few, samples=4)
    # scaling the perturbation by 2 scales a quadratic form by 4
    a = probe.fisher_kl(few, samples=4)
    b = probe.fisher_kl({k: 2 * d for k, d in few.items()}, samples=4)
    for k in few:
        assert b[k] == pytest.approx(4 * a[k], rel=1e-4)

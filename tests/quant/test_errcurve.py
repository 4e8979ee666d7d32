"""edgeq.quant.errcurve: the planner's layer output errors (after quantization, and after QERA
compensation at each rank) against their definitions and against the compensation the build ships."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from edgeq.quant import errcurve
from edgeq.quant.compensate import compensation
from edgeq.quant.errcurve import ExactWhitener, Whitener, top_sq_singular_values
from edgeq.quant.gptq import output_error, rtn
from edgeq.quant.intgroup import storage_codec


def _case(out: int, inn: int, seed: int = 0):
    """A Q4_0 round-to-nearest error of a random weight, under the covariance of anisotropic
    correlated activations (a few outlier channels, as in real models)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out, inn)) * 0.02).astype(np.float32)
    scale = np.exp(rng.standard_normal(inn)).astype(np.float32)
    scale[rng.choice(inn, 4, replace=False)] *= 20
    X = (rng.standard_normal((2 * inn, inn)) @ (np.eye(inn) + 0.1 * rng.standard_normal((inn, inn)))) * scale
    cov = X.T @ X / len(X)
    q = rtn(w, storage_codec("Q4_0"), np.diag(cov))
    return w, cov, w - q.dequant


def _by_definition(E, cov, ranks, damp=1e-4):
    """err(0) = tr(E C E^T); err(r) = err(0) - (top r squared singular values of E S),
    S = sqrtm(C + delta I), all float64 (scipy's matrix square root: independent of both paths)."""
    E = E.astype(np.float64)
    base = float(np.trace(E @ cov @ E.T))
    S = np.real(scipy.linalg.sqrtm(cov + damp * np.mean(np.diag(cov)) * np.eye(len(cov))))
    s2 = np.linalg.svd(E @ S, compute_uv=False) ** 2
    return base, {r: base - float(s2[:r].sum()) for r in ranks}


@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_errors_match_their_definition(shape):
    w, cov, E = _case(*shape)
    want_base, want = _by_definition(E, cov, [8, 16])
    for wh in (Whitener(cov), ExactWhitener(cov)):
        base, got = wh.curve(E, [8, 16, 10**6])  # a rank beyond min(shape) is left out
        assert base == pytest.approx(want_base, rel=1e-5)
        assert set(got) == {8, 16}
        for r in got:
            assert got[r] == pytest.approx(want[r], rel=1e-5)


def test_the_rank_curve_is_what_the_shipped_compensation_reaches():
    """err(r) is the output error left by edgeq.quant.compensate's rank-r QERA branch: a lower
    bound (the damped optimum, before the factors' fp16 rounding) within 2 %."""
    w, cov, E = _case(128, 96, seed=3)
    base, got = Whitener(cov).curve(E, [4, 16])
    for r, e in got.items():
        A, B = compensation(E, cov, r, "qera")
        real = output_error(E.astype(np.float64) - B.astype(np.float64) @ A.astype(np.float64), cov)
        assert e * (1 - 1e-6) <= real <= e * 1.02
        assert real < base


def test_randomized_singular_values_of_a_wide_error(monkeypatch):
    """Above DENSE_MAX the top singular values come from subspace iteration: lower bounds within
    0.5 % of the exact ones (in sum), deterministic."""
    monkeypatch.setattr(errcurve, "DENSE_MAX", 32)
    w, cov, E = _case(320, 256, seed=5)
    M = (E @ Whitener(cov).L).astype(np.float32)
    exact = np.linalg.svd(M.astype(np.float64), compute_uv=False)[:32] ** 2
    got = top_sq_singular_values(M, 32)
    assert np.all(got <= exact * (1 + 1e-5))
    assert got.sum() == pytest.approx(exact.sum(), rel=5e-3)
    assert np.array_equal(got, top_sq_singular_values(M, 32))


def test_a_covariance_that_is_not_positive_definite_is_clipped_like_qera():
    """Negative eigenvalues (beyond what the damping covers) are clipped to 0, as
    edgeq.quant.compensate.sqrt_and_inv does for the branch the build ships."""
    w, cov, E = _case(64, 64, seed=7)
    ev, Q = np.linalg.eigh(cov)
    ev[:3] = -ev.max()  # strongly negative: no damping rescues the Cholesky factorisation
    bad = (Q * ev) @ Q.T
    clipped = (Q * np.clip(ev, 0, None)) @ Q.T
    delta = 1e-4 * np.mean(np.diag(bad))
    S = np.real(scipy.linalg.sqrtm(clipped + delta * np.eye(64)))
    want_base = float(np.trace(E.astype(np.float64) @ clipped @ E.T.astype(np.float64)))
    want8 = want_base - float((np.linalg.svd(E @ S, compute_uv=False)[:8] ** 2).sum())
    base, got = Whitener(bad).curve(E, [8])
    assert base == pytest.approx(want_base, rel=1e-4)
    assert got[8] == pytest.approx(want8, rel=5e-3)  # float32 products; this covariance spans 7 decades

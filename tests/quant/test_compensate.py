"""Low-rank quantization-error compensation (QERA closed form, SVD baseline)."""
import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.quant.codecs import codec_for
from edgeq.quant.compensate import compensation
from edgeq.quant.gptq import gptq, output_error

RANKS = [1, 2, 4, 8, 16, 32]


@pytest.fixture(scope="module")
def errors(tiny_calibrated):
    """(error, covariance) of GPTQ Q4_0 for every linear of the tiny Llama."""
    ir, stats, _ = tiny_calibrated
    out = []
    for lin in ir.linears.values():
        cov = stats.layers[lin.layer].input_cov(lin.role)
        res = gptq(lin.weight, cov, codec_for("Q4_0"))
        out.append((lin.name, lin.weight - res.dequant, cov))
    return out


def test_output_error_decreases_monotonically_with_rank(errors):
    for name, E, cov in errors:
        prev = output_error(E, cov)
        for r in RANKS:
            if r > min(E.shape):
                break
            a, b = compensation(E, cov, r, "qera")
            err = output_error(E - b @ a, cov)
            assert err < prev, (name, r, err, prev)
            prev = err


def test_qera_beats_plain_svd_under_the_activations(errors):
    wins = 0
    for name, E, cov in errors:
        for r in (4, 16):
            a, b = compensation(E, cov, r, "qera")
            a2, b2 = compensation(E, cov, r, "svd")
            e_q, e_s = output_error(E - b @ a, cov), output_error(E - b2 @ a2, cov)
            assert e_q <= e_s * 1.001, (name, r, e_q, e_s)
            wins += e_q < e_s
    assert wins > 0


def test_factors_are_fp16_and_shaped(errors):
    _, E, cov = errors[0]
    a, b = compensation(E, cov, 8)
    assert a.shape == (8, E.shape[1]) and b.shape == (E.shape[0], 8)
    for m in (a, b):
        assert m.dtype == np.float32
        np.testing.assert_array_equal(m.astype(np.float16).astype(np.float32), m)


def test_full_rank_removes_the_error():
    rng = np.random.default_rng(0)
    E = rng.standard_normal((16, 16)) * 1e-2
    x = rng.standard_normal((256, 16))
    cov = x.T @ x / 256
    a, b = compensation(E, cov, 16, "qera")
    assert output_error(E - b @ a, cov) < 1e-4 * output_error(E, cov)


def test_errors():
    E = np.zeros((8, 16))
    with pytest.raises(EdgeqError, match="rank"):
        compensation(E, np.eye(16), 0)
    with pytest.raises(EdgeqError, match="rank"):
        compensation(E, np.eye(16), 9)
    with pytest.raises(EdgeqError, match="method"):
        compensation(E, np.eye(16), 2, "magic")
    with pytest.raises(EdgeqError, match="covariance"):
        compensation(E, None, 2, "qera")


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_wide_inputs_whitened_by_cholesky_reach_the_same_optimum(errors, monkeypatch, rank):
    # the oracle: the eigendecomposition (symmetric square root) path, kept for narrow inputs
    import edgeq.quant.compensate as cm

    def under_c(E, cov, A, B):
        D = E.astype(np.float64) - B.astype(np.float64) @ A.astype(np.float64)
        return float(np.einsum("ij,jk,ik->", D, cov, D))

    for name, E, cov in errors:
        if rank > min(E.shape):
            continue
        monkeypatch.setattr(cm, "EIGH_MAX", 1 << 20)
        a_eigh, b_eigh = compensation(E, cov, rank)
        monkeypatch.setattr(cm, "EIGH_MAX", 8)  # every tiny linear takes the Cholesky path
        a_chol, b_chol = compensation(E, cov, rank)
        assert np.all(a_chol.astype(np.float16).astype(np.float32) == a_chol)
        before = under_c(E, cov, np.zeros_like(a_eigh), np.zeros_like(b_eigh))
        got, want = under_c(E, cov, a_chol, b_chol), under_c(E, cov, a_eigh, b_eigh)
        assert got < before, name
        assert abs(got - want) <= 1e-3 * want + 1e-12 * before, (name, got, want)


def test_a_covariance_cholesky_cannot_factor_falls_back_to_the_clipped_square_root(monkeypatch):
    import edgeq.quant.compensate as cm

    monkeypatch.setattr(cm, "EIGH_MAX", 8)
    rng = np.random.default_rng(0)
    E = rng.standard_normal((16, 32))
    cov = np.eye(32)
    cov[3, 3] = -5.0  # indefinite even after the damping
    a, b = compensation(E, cov, 4)
    monkeypatch.setattr(cm, "EIGH_MAX", 1 << 20)
    a2, b2 = compensation(E, cov, 4)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)


@pytest.mark.parametrize("rank", [8, 32])
def test_randomized_top_triplets_reach_the_dense_svds_optimum(monkeypatch, rank):
    """Both sides wider than DENSE_SVD_MAX: the top triplets by randomized subspace iteration leave
    the output error under C of the dense SVD's factors (the oracle), to 0.1 % of what the
    branch removes, on a quantization-like error (round-to-nearest of a random weight: a flat
    spectrum, the hard case for a subspace method) under an anisotropic covariance."""
    import edgeq.quant.compensate as cm

    rng = np.random.default_rng(7)
    out, k = 384, 256
    W = rng.standard_normal((out, k)) * 0.02
    step = np.abs(W).max(axis=1, keepdims=True) / 7
    E = W - np.round(W / step) * step  # 4-bit-like round-to-nearest error
    X = rng.standard_normal((2 * k, k)) * np.exp(rng.standard_normal(k))
    cov = X.T @ X / len(X)

    def under_c(A, B):
        D = E - B.astype(np.float64) @ A.astype(np.float64)
        return float(np.einsum("ij,jk,ik->", D, cov, D))

    want_a, want_b = compensation(E, cov, rank)  # dense (both sides <= DENSE_SVD_MAX)
    monkeypatch.setattr(cm, "DENSE_SVD_MAX", 64)
    got_a, got_b = compensation(E, cov, rank)
    assert not np.array_equal(got_a, want_a)  # the randomized path ran
    before, got, want = under_c(0 * want_a, 0 * want_b), under_c(got_a, got_b), under_c(want_a, want_b)
    assert got < before and want < before
    assert abs(got - want) <= 1e-3 * (before - want), (got, want, before)
    again = compensation(E, cov, rank)  # seeded: the same bits every time
    assert np.array_equal(again[0], got_a) and np.array_equal(again[1], got_b)

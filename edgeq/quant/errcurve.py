"""A linear's output error after quantization, and after QERA compensation at every rank, cheaply.

For a weight error ``E`` (out x in) and the input covariance ``C`` of the linear's calibration
activations, the planner needs ``err(0) = tr(E C E^T)`` and, for each candidate rank ``r``, the
error left after the optimal activation-aware rank-``r`` correction (QERA's closed form,
:mod:`edgeq.quant.compensate`): ``err(r) = err(0) - sum_{i<r} sigma_i^2`` with ``sigma_i`` the
singular values of the whitened error ``E S``, ``S S^T = C + delta I`` (``delta`` QERA's damping).

How it is computed (one :class:`Whitener` per covariance, shared by the linears that read the
same input: q/k/v, gate/up):

* ``S`` is the **Cholesky factor** ``L`` of ``C + delta I`` (``n^3/3`` flops), not the symmetric
  square root (an eigendecomposition, ~27x the flops): ``(E L)(E L)^T = E (C + delta I) E^T =
  (E S)(E S)^T``, so ``E L`` and ``E S`` have the same singular values, and
  ``err(0) = ||E L||_F^2 - delta ||E||_F^2`` exactly.
* ``M = E L`` in float32 (a triangular product, ``out x in^2`` flops: with the candidate types'
  round-to-nearest fits, the step's whole O(params x in) cost).
* The top ``r_max`` singular values of ``M`` by **randomized subspace iteration** (a block of
  ``r_max + OVERSAMPLE`` vectors, ``POWER_ITERS`` passes of ``M^T`` and ``M``, Rayleigh-Ritz):
  O(out x in x r_max) instead of a dense SVD's O(out x in x min(out, in)) with its
  memory-bound bidiagonalisation. The Ritz values are lower bounds of the true ones; for the
  near-white spectra of quantization errors the sum of the top 32 converges to well under 1 %
  (so ``err(r)`` to ~0.1 %, tests/quant/test_errcurve.py). The start block is seeded, so the
  result is deterministic. Below ``DENSE_MAX`` (the smaller side) the exact singular values are
  used instead (a Gram matrix's eigenvalues: small models pay nothing for the shortcut).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

OVERSAMPLE = 16
POWER_ITERS = 4
DENSE_MAX = 1536  # smaller side at or below this: exact eigenvalues of the (float64) Gram matrix
_CHUNK = 1 << 22  # values per chunk of the float64 sums of squares (32 MB)


def _sum_sq(a: np.ndarray) -> float:
    """sum(a**2) accumulated in float64, a few rows at a time (no full float64 copy)."""
    total = 0.0
    rows = max(1, _CHUNK // max(1, a.shape[1]))
    for r0 in range(0, a.shape[0], rows):
        part = np.asarray(a[r0:r0 + rows], dtype=np.float64)
        total += float(np.einsum("ij,ij->", part, part))
    return total


class Whitener:
    """``L`` with ``L L^T = C + delta I`` (lower triangular, float32) for one input covariance."""

    def __init__(self, cov, damp: float = 1e-4):
        import scipy.linalg

        # a private float64 copy (a spilled covariance is read whole here), damped in place and
        # factored in place: ~1.5x the covariance's bytes at the peak (+ the float32 factor)
        C = np.array(cov, dtype=np.float64)
        self.cov_diag = np.diag(C).copy()  # undamped: the RTN fit's importance weights
        self.delta = damp * max(float(np.mean(self.cov_diag)), 1e-30)
        C[np.diag_indices_from(C)] += self.delta
        self.triangular = True
        try:  # the covariance is symmetric: its transpose is the Fortran-ordered buffer LAPACK factors in place
            L = scipy.linalg.cholesky(C.T, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:  # not numerically PSD: clip its negative eigenvalues (as QERA does)
            L = None
            self.triangular = False
        del C
        if L is None:
            C = np.array(cov, dtype=np.float64)
            ev, Q = np.linalg.eigh((C + C.T) / 2)
            del C
            ev = np.clip(ev, 0.0, None) + self.delta
            L = Q * np.sqrt(ev)  # not triangular, but L L^T = C_clipped + delta I all the same
            del Q
        self.L = np.asfortranarray(L, dtype=np.float32)  # the layout BLAS's trmm reads
        del L
        self.n = self.L.shape[0]

    def curve(self, err: np.ndarray, ranks: Sequence[int]) -> tuple[float, dict[int, float]]:
        """(err(0), {r: err(r)}) for the weight error ``err`` (out x in) and the positive ``ranks``."""
        E = np.asarray(err, dtype=np.float32)
        if self.triangular and E.flags.c_contiguous:  # E L = (L^T E^T)^T: a triangular product, half a GEMM
            from scipy.linalg.blas import strmm

            M = strmm(1.0, self.L, E.T, side=0, lower=1, trans_a=1).T
        else:
            M = E @ self.L
        base = max(_sum_sq(M) - self.delta * _sum_sq(E), 0.0)
        ranks = sorted({int(r) for r in ranks if 0 < int(r) <= min(E.shape)})
        if not ranks:
            return base, {}
        cum = np.cumsum(top_sq_singular_values(M, ranks[-1]))
        return base, {r: max(base - float(cum[r - 1]), 0.0) for r in ranks}


def _orth(Y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of a tall ``Y`` by Cholesky QR, twice (CholeskyQR2:
    GEMMs on the tall matrix, a b x b factorisation; LAPACK's Householder QR of a tall-skinny
    block is BLAS-2 bound and ~100x slower here). Falls back to Householder QR when the block is
    numerically rank deficient."""
    for _ in range(2):
        G = np.asarray(Y.T @ Y, dtype=np.float64)
        try:
            R = np.linalg.cholesky(G).T
        except np.linalg.LinAlgError:
            return np.linalg.qr(Y)[0]
        Y = Y @ np.linalg.inv(R).astype(Y.dtype)
    return Y


def top_subspace(M: np.ndarray, k: int, seed: int = 0, dtype=None, oversample: int = OVERSAMPLE,
                 passes: int = POWER_ITERS) -> np.ndarray:
    """An orthonormal basis (m x b, b = min(k + oversample, min(m, n))) of ``M``'s dominant column
    space by randomized subspace iteration from a seeded Gaussian block (``dtype``: the block's,
    default ``M``'s), ``passes`` power passes, CholeskyQR2 orthonormalisation."""
    m, n = M.shape
    b = min(k + oversample, min(m, n))
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, b)).astype(dtype or M.dtype)
    Y = M @ Q
    for _ in range(passes):
        Y = _orth(Y)
        Y = M @ _orth(M.T @ Y)
    return _orth(Y)


def top_sq_singular_values(M: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """The ``k`` largest squared singular values of ``M`` (float64, descending): exact for a
    small side <= ``DENSE_MAX``, else randomized subspace iteration (the module doc)."""
    m, n = M.shape
    if min(m, n) <= DENSE_MAX:
        A = np.asarray(M, dtype=np.float64)
        G = A.T @ A if n <= m else A @ A.T
        ev = np.linalg.eigvalsh(G)[::-1]
        return np.clip(ev[:k], 0.0, None)
    Y = top_subspace(M, k, seed, np.float32)
    B = np.asarray(Y.T @ M, dtype=np.float64)  # b x n: its singular values are M's Ritz values
    s = np.linalg.svd(B, compute_uv=False)
    return np.clip(s[:k] ** 2, 0.0, None)


class ExactWhitener(Whitener):
    """The reference the fast path is checked against (and what the planner computed before):
    the symmetric square root ``S`` of ``C + delta I`` by an eigendecomposition, ``err(0)`` in
    float64 from ``C`` itself, and a full float64 SVD of ``E S`` per error."""

    def __init__(self, cov, damp: float = 1e-4):
        from edgeq.quant.compensate import sqrt_and_inv

        self.cov = np.asarray(cov, dtype=np.float64)
        self.cov_diag = np.diag(self.cov).copy()
        self.S, _ = sqrt_and_inv(self.cov, damp)
        self.n = self.cov.shape[0]

    def curve(self, err: np.ndarray, ranks: Sequence[int]) -> tuple[float, dict[int, float]]:
        E = np.asarray(err, dtype=np.float64)
        base = float(np.einsum("ij,ij->", E @ self.cov, E))
        ranks = sorted({int(r) for r in ranks if 0 < int(r) <= min(E.shape)})
        if not ranks:
            return base, {}
        cum = np.cumsum(np.linalg.svd(E @ self.S, compute_uv=False) ** 2)
        return base, {r: max(base - float(cum[r - 1]), 0.0) for r in ranks}

"""Low-rank quantization-error compensation: ``W ≈ Q(W) + B·A``.

Given the quantization error ``E = W - Q(W)`` (out x in) of one linear and the input covariance
``C = E[x x^T]`` of its calibration activations, find rank-``r`` factors minimising the expected
output error ``E_x ||(E - B A) x||² = ||(E - B A) C^{1/2}||_F²``.

* ``qera`` (activation-aware, QERA's closed form): with ``S = C^{1/2}`` (damped), the optimum is
  the rank-r truncated SVD of ``E S`` mapped back, ``B A = [E S]_r S^{-1}``.
* ``svd`` (baseline): the truncated SVD of ``E`` itself (optimal for white inputs, C = I).

Factors are returned balanced (``B = U √Σ``, ``A = √Σ V^T S^{-1}``) and rounded to fp16, the
precision they are stored in; ``B`` is then refitted in float64 against the fp16 ``A`` (a least
squares solve under C) before its own fp16 rounding, so the rounding of A costs nothing.
The branch is applied as ``y += (x @ A.T) @ B.T`` (scale 1), i.e. an :class:`edgeq.ir.LowRank`
with ``source="qerr"``.
"""
from __future__ import annotations

import numpy as np

from edgeq.errors import EdgeqError

METHODS = ("qera", "svd")


def sqrt_and_inv(C: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(S, S⁻¹) with S = (C + damp·mean(diag C)·I)^½ for a symmetric PSD covariance C (eigh;
    negative eigenvalues clipped): the whitening QERA's closed form and the planner both use."""
    C = np.asarray(C, dtype=np.float64)
    ev, Q = np.linalg.eigh((C + C.T) / 2)
    ev = np.clip(ev, 0.0, None) + damp * max(float(np.mean(np.diag(C))), 1e-30)
    r = np.sqrt(ev)
    return (Q * r) @ Q.T, (Q / r) @ Q.T


# Wider inputs whiten with a Cholesky factor instead of the symmetric square root: any F with
# F F^T = C gives the same objective ||(E - B A) F||_F^2 = tr((E - B A) C (E - B A)^T), so
# [E L]_r L^-1 is the same optimum as [E S]_r S^-1, for K^3/3 multiply-adds instead of an
# eigendecomposition's ~9 K^3 (8192 wide: ~2 min -> ~4 s on one core here). At or below this width
# (every SmolLM2 / Gemma 3 270M / Llama-3.2-1B-shape linear but down_proj) the eigh path is kept,
# so those artifacts keep their bytes.
EIGH_MAX = 2048
# Where both sides of the whitened error are wider than this, its top singular triplets come from
# randomized subspace iteration (edgeq.quant.errcurve.top_subspace: a block of rank + 32, 8 power
# passes, then the exact SVD of the b x in projection) instead of a full SVD (~6 m n^2 flops: a
# 3B-shape gate_proj, 8192 x 3072, ~0.5 TFLOP, ~1 min on one core here, for 32 of its 3072
# triplets). On that shape's whitened random error the block captures the top-32 energy of the
# converged iteration to 4e-6 (the planner's cheaper 16 / 4: to 2e-3, too coarse for the branch
# itself). B is refitted against the rounded A in any case (below). SmolLM2 / Gemma 3 270M /
# 1B-shape linears have a side <= 2048 and keep the dense SVD (and their bytes).
DENSE_SVD_MAX = 2048
SVD_OVERSAMPLE, SVD_PASSES = 32, 8


def _top_svd(M: np.ndarray, rank: int):
    """(U, s, Vt) holding (at least) the top ``rank`` singular triplets of ``M``, descending."""
    if min(M.shape) <= DENSE_SVD_MAX:
        return np.linalg.svd(M, full_matrices=False)
    from edgeq.quant.errcurve import top_subspace

    Y = top_subspace(M, rank, oversample=SVD_OVERSAMPLE, passes=SVD_PASSES)
    Ub, s, Vt = np.linalg.svd(Y.T @ M, full_matrices=False)
    return Y @ Ub, s, Vt


def _whitened(E: np.ndarray, cov: np.ndarray, damp: float):
    """(E F, apply F^-1 to the rows of a matrix) for a factor F F^T = C + damp * mean(diag C) * I."""
    K = E.shape[1]
    if K > EIGH_MAX:
        import scipy.linalg

        C = np.array(cov, dtype=np.float64)
        C[np.diag_indices(K)] += damp * max(float(np.mean(np.diag(C))), 1e-30)
        try:
            L = scipy.linalg.cholesky(C, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            L = None  # not positive definite after damping (negative eigenvalues): clip them, as below
        if L is not None:
            return E @ L, lambda X: scipy.linalg.solve_triangular(L, X.T, lower=True, trans="T").T
    S, S_inv = sqrt_and_inv(cov, damp)
    return E @ S, lambda X: X @ S_inv


def compensation(err: np.ndarray, cov: np.ndarray | None, rank: int, method: str = "qera",
                 damp: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(A (rank x in), B (out x rank)) float32 holding fp16-representable values."""
    if method not in METHODS:
        raise EdgeqError(f"unknown compensation method {method!r} (expected one of {', '.join(METHODS)})")
    E = np.asarray(err, dtype=np.float64)
    out, K = E.shape
    rank = int(rank)
    if rank < 1 or rank > min(out, K):
        raise EdgeqError(f"compensation rank must be in [1, {min(out, K)}], got {rank}")
    if method == "qera":
        if cov is None:
            raise EdgeqError("qera compensation needs the input covariance")
        M, unwhiten = _whitened(E, cov, damp)
    else:
        M, unwhiten = E, None
    U, s, Vt = _top_svd(M, rank)
    del M
    r = np.sqrt(s[:rank])
    A = r[:, None] * Vt[:rank]
    if unwhiten is not None:
        A = unwhiten(A)
    A = A.astype(np.float16).astype(np.float64)
    # refit B against the rounded A: minimise ||(E - B A) W||² with W = S (qera) or I (svd)
    G = A @ cov @ A.T if method == "qera" else A @ A.T
    rhs = E @ (cov @ A.T if method == "qera" else A.T)
    G[np.diag_indices(rank)] += 1e-12 * max(float(np.trace(G)) / rank, 1e-30)
    try:
        B = np.linalg.solve(G, rhs.T).T
    except np.linalg.LinAlgError:
        B = U[:, :rank] * r[None, :]
    B = B.astype(np.float16)
    if not np.all(np.isfinite(B)):
        raise EdgeqError("compensation factors overflow fp16")
    return A.astype(np.float32), B.astype(np.float32)

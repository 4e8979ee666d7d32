"""GPTQ (Frantar et al., 2022) that emits codes directly on a target format's grid.

For one linear ``W`` (out x in) and the input covariance ``H = E[x x^T]`` of its calibration
activations (``edgeq.calibrate``), columns are quantized one at a time and the rounding error
of each column is spread over the not-yet-quantized columns through the inverse Hessian's
Cholesky factor, minimising the layer output error ``tr(E H E^T)`` (``E = W - W_q``).

Grid-exact: the quantizer of a column is a :class:`edgeq.quant.codecs.Codec` (GGUF Q4_0 ...
Q6_K, or the generic int group format). The parameters of each codec block (the block of
``codec.block`` input columns sharing one scale / min, e.g. 32 or 256) are fitted when GPTQ
reaches the block's first column, on the weights *as updated so far* (and weighted by
``diag(H)``), then every column of the block is encoded with them. The result is the codes and
the block parameters themselves, so lowering packs them without re-quantizing: lossless.

Weights already on the grid (a checkpoint dequantized from a GGUF of this type, e.g. the Q4_K /
Q5_0 tensors of a Q4_K_M release): GPTQ would fit each block's parameters on error-updated
weights and round them off the grid they came on, so :func:`gptq` first tries round-to-nearest
and keeps its codes and block parameters for every row it reproduces (relative error <=
``GRID_EXACT``: lossless where GPTQ is not); GPTQ runs on the other rows (rows are independent
under GPTQ, so a row's result does not depend on which others run with it). A weight with no such
row (any trained or fine-tuned one) takes exactly the path it took before.

Options: ``damp`` (relative to ``mean(diag H)``, added to the diagonal), ``act_order``
(process columns by decreasing ``diag(H)``; block parameters are then fitted up front on the
original weights, "static groups", since a block's columns are no longer contiguous in time),
``batch`` (lazy-update width; rounded up to a multiple of the codec block so a block's fit
always sees fully updated weights). Rows are independent, so the result does not depend on
row order (GGUF's Q/K row permutation can be applied to the codes afterwards).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.quant.codec_base import Params
from edgeq.quant.intgroup import IntGroupTensor


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01
    act_order: bool = False
    batch: int = 128

    def to_json(self) -> dict:
        return {"damp": self.damp, "act_order": self.act_order, "batch": self.batch}


@dataclass
class GridResult:
    """Codes and block parameters of one quantized matrix, plus its dequantized values."""

    params: list[Any]  # one codec Params per block of columns, in column order
    codes: np.ndarray  # (out, in) int16
    dequant: np.ndarray  # (out, in) float32: exactly what a runtime decodes

    def output_error(self, w: np.ndarray, cov: np.ndarray) -> float:
        return output_error(w - self.dequant, cov)


def output_error(e: np.ndarray, cov: np.ndarray) -> float:
    """Mean squared output error ``tr(E C E^T)`` of an error ``E`` (out x in) under input covariance C."""
    e = np.asarray(e, dtype=np.float64)
    return float(np.einsum("ij,ij->", e @ np.asarray(cov, dtype=np.float64), e))


def _check(w: np.ndarray, codec) -> tuple[int, int]:
    if w.ndim != 2:
        raise EdgeqError(f"expected a 2-D weight, got shape {w.shape}")
    R, K = w.shape
    if K % codec.block:
        raise EdgeqError(f"{codec.qtype}: needs an input width that is a multiple of {codec.block}, got {K}")
    return R, K


def rtn(w: np.ndarray, codec, weight: np.ndarray | None = None) -> GridResult:
    """Round-to-nearest on the codec's grid (each block fitted on the original weights).

    Unweighted, the legacy types reproduce ggml's ``quantize_row_*_ref`` byte for byte
    (``Codec.rtn``); with ``weight`` (e.g. diag of the input covariance) the fit may search."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    R, K = _check(w, codec)
    B = codec.block
    params, codes, deq = [], np.empty((R, K), np.int16), np.empty((R, K), np.float32)
    cols = np.arange(B)
    for s in range(0, K, B):
        blk = w[:, s:s + B]
        p, q = codec.rtn(blk, None if weight is None else weight[s:s + B])
        params.append(p)
        codes[:, s:s + B] = q
        deq[:, s:s + B] = codec.decode(p, q, cols)
    return GridResult(params, codes, deq)


# round-to-nearest "reproduces" a weight when its relative Frobenius error is at most this (float32
# decoding of a block's scale x code rounds at ~6e-8 relative; an off-grid weight at 8 bits is ~1e-2)
GRID_EXACT = 1e-6


def grid_rows(w: np.ndarray, codec, weight: np.ndarray | None = None) -> tuple[GridResult, np.ndarray]:
    """RTN's result and the (R,) mask of the rows it reproduces (rows already on ``codec``'s grid)."""
    res = rtn(w, codec, weight)
    exact = np.empty(len(res.dequant), bool)
    for s in range(0, len(exact), 1024):  # float64 rows a chunk at a time (no (R, K) float64 temporary)
        w64 = np.asarray(w[s:s + 1024], dtype=np.float64)
        e = w64 - res.dequant[s:s + 1024]
        exact[s:s + 1024] = np.einsum("ij,ij->i", e, e) <= GRID_EXACT ** 2 * np.einsum("ij,ij->i", w64, w64)
    return res, exact


def _merge_rows(a: GridResult, b: GridResult, rows_b: np.ndarray) -> GridResult:
    """``a`` with the rows ``rows_b`` (int indices) replaced by ``b``'s rows (``b`` holds only those)."""
    def put(x, y):
        if x is None:
            return None
        x = np.array(x)
        x[rows_b] = y
        return x
    params = [Params(*(put(getattr(pa, f), getattr(pb, f)) for f in ("d", "m", "sc", "mn", "zp")))
              for pa, pb in zip(a.params, b.params)]
    codes, deq = a.codes.copy(), a.dequant.copy()
    codes[rows_b] = b.codes
    deq[rows_b] = b.dequant
    return GridResult(params, codes, deq)


def _reverse_in_place(a: np.ndarray, chunk: int = 1 << 20) -> None:
    """Reverse the elements of the C-contiguous ``a`` in place (flat order), ``chunk`` at a time:
    for a square matrix that is J a J (rows and columns reversed) without a second matrix."""
    f = a.reshape(-1)
    n = f.size
    for s in range(0, n // 2, chunk):
        e = min(s + chunk, n // 2)
        lo = f[s:e].copy()
        f[s:e] = f[n - e:n - s][::-1]
        f[n - e:n - s] = lo[::-1]


def _inverse_cholesky(H: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), float64, without forming H^-1.

    With J the order-reversing permutation, factor J H J = M M^T (M lower); then
    H^-1 = J M^-T M^-1 J = U^T U for U = J M^-1 J, which is upper triangular with a positive
    diagonal, so it is *the* Cholesky factor (unique). One potrf and one trtri (2/3 K^3
    multiply-adds) in one K x K buffer, instead of a Cholesky, an LU solve against the identity,
    a full product and a second Cholesky (~5 K^3 and six K x K matrices: 537 MB each for the
    8192-wide down_proj at 1B). Same bits as that construction on the models measured (a 1B
    layer's GPTQ: tools/bench_split.py's digest). ``overwrite``: ``H`` (C-contiguous float64)
    is a scratch copy the factorisation may use as its buffer."""
    from scipy.linalg import lapack

    if overwrite and H.dtype == np.float64 and H.flags.c_contiguous:
        A = H
    else:
        A = np.array(H, dtype=np.float64, order="C")
    _reverse_in_place(A)  # J H J, symmetric: its Fortran view A.T is the same matrix
    M, info = lapack.dpotrf(A.T, lower=1, clean=1, overwrite_a=1)
    if info == 0:
        M, info = lapack.dtrtri(M, lower=1, overwrite_c=1)
    if info != 0:
        raise EdgeqError("GPTQ: the damped Hessian is not positive definite; raise damp")
    return np.ascontiguousarray(M[::-1, ::-1])


def gptq(w: np.ndarray, cov: np.ndarray, codec, config: GPTQConfig | None = None) -> GridResult:
    """Quantize ``w`` (out x in, float32) on ``codec``'s grid with GPTQ under input covariance ``cov``."""
    cfg = config or GPTQConfig()
    W = np.array(w, dtype=np.float64)
    R, K = _check(W, codec)
    H = np.array(cov, dtype=np.float64)
    if H.shape != (K, K):
        raise EdgeqError(f"GPTQ: covariance of shape {H.shape} for a weight with {K} input columns")
    if not np.all(np.isfinite(H)) or not np.all(np.isfinite(W)):
        raise EdgeqError("GPTQ: non-finite weight or covariance")
    diag = np.diag(H).copy()
    dead = diag <= 0
    H[dead, dead] = 1.0
    # dead inputs (always 0, e.g. a norm weight of exactly 0) keep their weights: H is 1 on their diagonal and 0
    # off it, so their rounding error reaches no other column, and a block stays on the grid it came on
    importance = np.where(dead, 0.0, diag)
    exact_res, exact = grid_rows(w, codec, importance)
    if exact.all():
        return exact_res
    if exact.any():
        rows = np.flatnonzero(~exact)
        return _merge_rows(exact_res, _gptq_rows(W[rows], H, diag, importance, codec, cfg), rows)
    del exact_res
    return _gptq_rows(W, H, diag, importance, codec, cfg)


def _gptq_rows(W: np.ndarray, H: np.ndarray, diag: np.ndarray, importance: np.ndarray, codec,
               cfg: GPTQConfig) -> GridResult:
    """GPTQ of the rows ``W`` (float64, a private copy) under the covariance ``H`` (float64, dead
    inputs set to 1 on its diagonal; a private copy, used as scratch); ``diag``: the covariance's
    own diagonal (the act-order key), ``importance``: the block fits' weights."""
    R, K = W.shape
    B = codec.block
    H[np.diag_indices(K)] += cfg.damp * float(np.mean(np.diag(H)))

    perm = np.argsort(-diag, kind="stable") if cfg.act_order else np.arange(K)
    n_blocks = K // B
    params: list[Any] = [None] * n_blocks
    if cfg.act_order:  # static groups: fit every block on the original weights
        w32 = W.astype(np.float32)
        for b in range(n_blocks):
            params[b] = codec.fit(w32[:, b * B:(b + 1) * B], importance[b * B:(b + 1) * B])
    W = W[:, perm]
    Hp = H[np.ix_(perm, perm)] if cfg.act_order else H
    del H
    U = _inverse_cholesky(Hp, overwrite=True)  # (one K x K buffer less: 537 MB for down_proj at 1B)
    del Hp

    batch = max(B, -(-int(cfg.batch) // B) * B)
    codes = np.empty((R, K), np.int16)
    deq = np.empty((R, K), np.float32)
    for i1 in range(0, K, batch):
        i2 = min(i1 + batch, K)
        W1 = W[:, i1:i2].copy()
        Err = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            b, j = divmod(col, B)
            if params[b] is None:  # not act_order: the block starts here and lies inside W1
                params[b] = codec.fit(W1[:, i:i + B].astype(np.float32), importance[col:col + B])
            x = W1[:, i:i + 1].astype(np.float32)
            jj = np.array([j])
            q = codec.encode(params[b], x, jj)
            v = codec.decode(params[b], q, jj)
            codes[:, col] = q[:, 0]
            deq[:, col] = v[:, 0]
            err = (W1[:, i] - v[:, 0].astype(np.float64)) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    return GridResult(params, codes, deq)


def pack_gguf(result: GridResult, codec) -> np.ndarray:
    """(out, row_nbytes) uint8: the GGML bytes of a GridResult, blocks in column order."""
    B = codec.block
    parts = [codec.pack(p, result.codes[:, b * B:(b + 1) * B]) for b, p in enumerate(result.params)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.uint8)


def to_int_group(result: GridResult, codec):
    """An :class:`edgeq.quant.intgroup.IntGroupTensor` (ONNX MatMulNBits / TVM layout) of a
    GridResult made with an int-group codec; it dequantizes to exactly ``result.dequant``."""
    fmt = codec.fmt
    R, K = result.codes.shape
    d = np.stack([np.asarray(p.d, np.float32) for p in result.params], axis=1)  # (R, n_groups)
    zp = None if fmt.symmetric else np.stack([np.asarray(p.zp, np.uint8) for p in result.params], axis=1)
    return IntGroupTensor(fmt, (R, K), result.codes.astype(np.uint8), d, zp)

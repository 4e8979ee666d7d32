"""numpy oracle of the int8-activation kernels (:mod:`edgeq.kernels.tir_dot`): the same
per-group activation quantization, bit for bit, and the same integer dot products, exactly.

* :func:`quantize_activations` — ``x`` (M, K) float32 -> int8 codes and a float32 scale per
  (row, group): ``amax = max |x|``, ``xq = rint(x * (127 / amax))`` (round half to even, as the
  kernels' ``nearbyint``), ``dx = amax / 127``; an all-zero group gives codes 0, scale 0.
* :func:`integer_sums` — ``Σ xq · q`` per (row, output, group) over the raw weight codes, int64.
* :func:`reference` — what the kernel returns, in float64: ``Σ_g dx · s · (Σ xq·q − z · Σ xq)``
  plus the low-rank branch on the float ``x``.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from edgeq.kernels import layout
from edgeq.kernels.spec import KernelSpec


def quantize_activations(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float32)
    m, k = x.shape
    xg = x.reshape(m, k // group, group)
    amax = np.abs(xg).max(axis=-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    xq = np.rint(xg * inv[..., None]).astype(np.int8).reshape(m, k)
    return xq, (amax / np.float32(127)).astype(np.float32)


def integer_sums(spec: KernelSpec, arrays: Mapping[str, np.ndarray], xq: np.ndarray, n: int) -> np.ndarray:
    """(M, n, K' / group) int64: per group, the dot product of the int8 activations with the raw codes."""
    m, k = xq.shape
    q = layout.unpack_codes(arrays["qw"], spec)[:n, :k].astype(np.int64)
    g = spec.group
    return np.einsum("mgi,ngi->mng", xq.astype(np.int64).reshape(m, k // g, g), q.reshape(n, k // g, g))


def reference(spec: KernelSpec, arrays: Mapping[str, np.ndarray], x: np.ndarray, n: int | None = None) -> np.ndarray:
    """What an ``act="int8"`` kernel computes, in float64 (``x`` (M, K') with K' <= K active, the first ``n`` outputs)."""
    n = arrays["sc"].shape[0] * spec.block if n is None else n
    xq, dx = quantize_activations(x, spec.group)
    m, k = xq.shape
    ng = k // spec.group
    isum = integer_sums(spec, arrays, xq, n).astype(np.float64)  # (M, n, G)
    xsum = xq.astype(np.int64).reshape(m, ng, spec.group).sum(-1).astype(np.float64)  # (M, G)

    def rows(a):  # (NB, NG, block) -> (N, NG)
        return np.moveaxis(a, -1, 1).reshape(-1, a.shape[1])[:n, :ng].astype(np.float64)

    s = rows(arrays["sc"])
    z = np.float64(spec.zero_point) if spec.symmetric else rows(arrays["zp"])[None]
    y = ((isum - z * xsum[:, None, :]) * s[None] * dx.astype(np.float64)[:, None, :]).sum(-1)
    if spec.rank:
        a, b = layout.unpack_low_rank(arrays, spec)
        xf = np.asarray(x, np.float64)
        y = y + (xf @ a.astype(np.float64)[:, :k].T) @ b.astype(np.float64)[:n].T
    return y

"""numpy side of the generated kernels: pack weights into their layout, and the reference.

See :mod:`edgeq.kernels.spec` for the layout. Everything here is plain numpy (no TVM): the
lowering packs with it and the tests compare every kernel with :func:`reference`.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.kernels.spec import KernelSpec


def _blocked(a: np.ndarray, block: int) -> np.ndarray:
    """(N, ...) -> (N / block, ..., block)."""
    n = a.shape[0]
    if n % block:
        raise EdgeqError(f"{n} output channels are not a multiple of the kernel block {block}")
    return np.ascontiguousarray(np.moveaxis(a.reshape(n // block, block, *a.shape[1:]), 1, -1))


def pack_weight(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, spec: KernelSpec
                ) -> dict[str, np.ndarray]:
    """Group codes (N, K) uint8, scales (N, K/group), zero points (N, K/group) or None -> the
    kernel's ``qw``, ``sc`` (and ``zp``) arrays."""
    n, k = codes.shape
    if k % spec.group or scales.shape != (n, k // spec.group):
        raise EdgeqError(f"codes {codes.shape} / scales {scales.shape} do not fit group {spec.group}")
    if (zero_points is None) != spec.symmetric:
        raise EdgeqError("zero points must be given exactly for an asymmetric kernel")
    q = codes.astype(np.uint8)
    if spec.bits == 4:
        if int(q.max(initial=0)) > 15:
            raise EdgeqError("4-bit codes above 15")
        q = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)  # position 2i low nibble, 2i+1 high
    out = {"qw": _blocked(q, spec.block), "sc": _blocked(scales.astype(np.float32), spec.block)}
    if zero_points is not None:
        out["zp"] = _blocked(zero_points.astype(np.float32), spec.block)
    return out


def pack_low_rank(a: np.ndarray, b: np.ndarray, spec: KernelSpec) -> dict[str, np.ndarray]:
    """A (rank, K), B (N, rank) (scale already folded in) -> the kernel's ``a``, ``b``."""
    if a.shape[0] != spec.rank or b.shape[1] != spec.rank:
        raise EdgeqError(f"low-rank factors {a.shape} / {b.shape} do not have the kernel's rank {spec.rank}")
    dt = np.dtype(spec.lr_dtype)
    return {"a": np.ascontiguousarray(a.T, dt), "b": _blocked(b.astype(dt), spec.block)}


def unpack_weight(arrays: Mapping[str, np.ndarray], spec: KernelSpec) -> np.ndarray:
    """The dequantized (N, K) weight the kernel computes with, from its packed arrays."""
    qw = np.moveaxis(arrays["qw"], -1, 1)  # (NB, block, KP)
    qw = qw.reshape(-1, qw.shape[-1])
    if spec.bits == 4:
        q = np.empty((qw.shape[0], qw.shape[1] * 2), np.uint8)
        q[:, 0::2], q[:, 1::2] = qw & 15, qw >> 4
    else:
        q = qw
    def rows(x):  # (NB, G, block) -> (N, G)
        return np.moveaxis(x, -1, 1).reshape(-1, x.shape[1])
    s = rows(arrays["sc"])
    z = np.float32(spec.zero_point) if spec.symmetric else rows(arrays["zp"])[..., None]
    n, k = q.shape
    deq = (q.reshape(n, -1, spec.group).astype(np.float32) - z) * s[..., None]
    return deq.reshape(n, k).astype(np.float32)


def unpack_low_rank(arrays: Mapping[str, np.ndarray], spec: KernelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(A (rank, K), B (N, rank)) from the kernel's ``a``, ``b``."""
    return arrays["a"].T, np.moveaxis(arrays["b"], -1, 1).reshape(-1, spec.rank)


def reference(spec: KernelSpec, arrays: Mapping[str, np.ndarray], x: np.ndarray, n: int | None = None) -> np.ndarray:
    """What the kernel computes, in float64: ``x`` (M, K') with K' <= K the active inputs, the first
    ``n`` (default all) outputs."""
    w = unpack_weight(arrays, spec).astype(np.float64)
    n = w.shape[0] if n is None else n
    k = x.shape[1]
    x = x.astype(np.float64)
    y = x @ w[:n, :k].T
    if spec.rank:
        a, b = unpack_low_rank(arrays, spec)
        y = y + (x @ a.astype(np.float64)[:, :k].T) @ b.astype(np.float64)[:n].T
    return y

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
    if spec.bits == 4 and int(q.max(initial=0)) > 15:
        raise EdgeqError("4-bit codes above 15")
    if spec.dot_layout:
        qw = _dot_blocked(q, spec)
    elif spec.bits == 4:
        qw = _blocked((q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), spec.block)  # 2i low nibble, 2i+1 high
    else:
        qw = _blocked(q, spec.block)
    out = {"qw": qw, "sc": _blocked(scales.astype(np.float32), spec.block)}
    if zero_points is not None:
        out["zp"] = _blocked(zero_points.astype(np.float32), spec.block)
    return out


def _dot_blocked(q: np.ndarray, spec: KernelSpec) -> np.ndarray:
    """Codes (N, K) -> the integer-dot layout (N / block, K * bits / 32, 4 * block) (spec.py)."""
    n, k = q.shape
    if n % spec.block:
        raise EdgeqError(f"{n} output channels are not a multiple of the kernel block {spec.block}")
    if spec.bits == 4:  # word c: low nibbles positions 8c..8c+3, high nibbles 8c+4..8c+7
        q8 = q.reshape(n, k // 8, 2, 4)
        words = (q8[:, :, 0] | (q8[:, :, 1] << 4)).astype(np.uint8)
    else:
        words = q.reshape(n, k // 4, 4)
    kw = words.shape[1]
    return np.ascontiguousarray(words.reshape(n // spec.block, spec.block, kw, 4).transpose(0, 2, 1, 3)
                                .reshape(n // spec.block, kw, 4 * spec.block))


def unpack_codes(qw: np.ndarray, spec: KernelSpec) -> np.ndarray:
    """The codes (N, K) uint8 of a packed ``qw`` (either layout)."""
    if spec.dot_layout:
        nb, kw, _ = qw.shape
        words = qw.reshape(nb, kw, spec.block, 4).transpose(0, 2, 1, 3).reshape(nb * spec.block, kw, 4)
        if spec.bits == 8:
            return words.reshape(nb * spec.block, -1)
        return np.stack([words & 15, words >> 4], axis=2).reshape(nb * spec.block, -1)
    qw = np.moveaxis(qw, -1, 1)  # (NB, block, KP)
    qw = qw.reshape(-1, qw.shape[-1])
    if spec.bits == 8:
        return qw
    q = np.empty((qw.shape[0], qw.shape[1] * 2), np.uint8)
    q[:, 0::2], q[:, 1::2] = qw & 15, qw >> 4
    return q


def pack_low_rank(a: np.ndarray, b: np.ndarray, spec: KernelSpec) -> dict[str, np.ndarray]:
    """A (rank, K), B (N, rank) (scale already folded in) -> the kernel's ``a``, ``b``."""
    if a.shape[0] != spec.rank or b.shape[1] != spec.rank:
        raise EdgeqError(f"low-rank factors {a.shape} / {b.shape} do not have the kernel's rank {spec.rank}")
    dt = np.dtype(spec.lr_dtype)
    return {"a": np.ascontiguousarray(a.T, dt), "b": _blocked(b.astype(dt), spec.block)}


def unpack_weight(arrays: Mapping[str, np.ndarray], spec: KernelSpec) -> np.ndarray:
    """The dequantized (N, K) weight the kernel computes with, from its packed arrays."""
    q = unpack_codes(arrays["qw"], spec)

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

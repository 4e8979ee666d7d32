"""One BLAS thread while a build step runs: builds byte-identical across thread counts.

OpenBLAS does not give the same bits with one thread and with several on every CPU (seen on an
AMD EPYC, where OpenBLAS 0.3.30/0.3.31 pick their Haswell kernels: float32 GEMM, 1 vs 2 threads,
differs in ~10 % of the outputs of a 32x576 @ 576x1536 product; float64 Cholesky (potrf) and
symmetric eigendecomposition differ in 20-60 % of their outputs at 1536-8192 wide; float64
GEMM / SYRK agreed). A reference-format artifact's goldens (the reference runtime in float32)
changed in the 5th decimal with ``OMP_NUM_THREADS``, and the MLP sort's ridge scores (potrf +
trtri) of a 1B model would too. So every build step runs with every BLAS library the process
uses held to one thread (threadpoolctl), whatever the environment asks.

There are two: numpy's OpenBLAS and scipy's own (``scipy_openblas``, used by calibration's SYRK,
the MLP sort's potrf / trtri and the planner's Cholesky). threadpoolctl limits only libraries
already loaded when the limit is set, and scipy loads its BLAS on first import — inside a step —
so :func:`one_blas_thread` imports ``scipy.linalg`` first (before this, scipy's BLAS ran on every
core during a build). edgeq's own worker threads (``EDGEQ_THREADS``: quantizers, writers,
calibration shards) are not affected, and the runtimes (verify, run, profile) keep the threads
they are given.

:func:`syrk_lower` is the Gram update (``acc += x^T x``) of calibration: scipy's ``dsyrk`` called
through ctypes, which releases the GIL (scipy's f2py wrapper holds it), so calibration shards on
worker threads update their sums at the same time; the same routine and arguments, the same bits."""
from __future__ import annotations

import ctypes
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import numpy as np


@contextmanager
def one_blas_thread() -> Iterator[None]:
    import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS, so that the limit reaches it)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _scipy_routine(table, name: str, *argtypes):
    """A routine of scipy's public Cython BLAS / LAPACK table as a ctypes function (the very
    routine scipy's own wrappers call): ctypes releases the GIL for the call, f2py's wrappers
    hold it, so threads could not overlap them."""
    cap = table.__pyx_capi__[name]
    cap_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))(cap)
    get = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer", ctypes.pythonapi))
    return ctypes.CFUNCTYPE(None, *argtypes)(get(cap, cap_name))


_IP, _DP, _VP, _CP = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double), ctypes.c_void_p, ctypes.c_char_p


@lru_cache(maxsize=1)
def _dsyrk():
    from scipy.linalg import cython_blas

    return _scipy_routine(cython_blas, "dsyrk", _CP, _CP, _IP, _IP, _DP, _VP, _IP, _DP, _VP, _IP)


@lru_cache(maxsize=1)
def _dpotrf_dtrtri():
    from scipy.linalg import cython_lapack

    return (_scipy_routine(cython_lapack, "dpotrf", _CP, _IP, _VP, _IP, _IP),
            _scipy_routine(cython_lapack, "dtrtri", _CP, _CP, _IP, _VP, _IP, _IP))


def inverse_cholesky_lower(a: np.ndarray) -> int:
    """In place: the square, Fortran-ordered float64 ``a`` (symmetric; its lower triangle is read)
    becomes L^-1, the inverse of its lower Cholesky factor, upper triangle zeroed — what
    ``scipy.linalg.lapack.dpotrf(a, lower=1, clean=1, overwrite_a=1)`` then ``dtrtri(L, lower=1,
    overwrite_c=1)`` give (the same LAPACK routines: the same bits), without holding the GIL.
    Returns LAPACK's ``info`` (0: done; > 0: not positive definite, ``a`` then undefined)."""
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.dtype != np.float64 or not a.flags.f_contiguous \
            or not a.flags.writeable:
        raise ValueError(f"inverse_cholesky_lower: need a writable Fortran-ordered float64 square matrix, got "
                         f"{a.dtype} {a.shape}")
    n = a.shape[0]
    if n == 0:
        return 0
    potrf, trtri = _dpotrf_dtrtri()
    i, info = ctypes.c_int, ctypes.c_int(0)
    potrf(b"L", ctypes.byref(i(n)), a.ctypes.data, ctypes.byref(i(n)), ctypes.byref(info))
    if info.value != 0:
        return int(info.value)
    for j in range(1, n):  # clean: zero the upper triangle (column j is contiguous in Fortran order)
        a[:j, j] = 0.0
    trtri(b"L", b"N", ctypes.byref(i(n)), a.ctypes.data, ctypes.byref(i(n)), ctypes.byref(info))
    return int(info.value)


def syrk_lower(acc: np.ndarray, x: np.ndarray) -> None:
    """``acc += x^T x`` into the lower triangle of the square, Fortran-ordered float64 ``acc``, in
    place, products and sums in float64: BLAS ``dsyrk`` (uplo L, trans T) on a Fortran-ordered
    float64 copy of ``x`` — the very call ``scipy.linalg.blas.dsyrk(1.0, x, beta=1.0, c=acc,
    trans=1, lower=1, overwrite_c=1)`` makes (the same bits), without holding the GIL."""
    a = np.asfortranarray(x, dtype=np.float64)
    if a.ndim != 2 or acc.dtype != np.float64 or acc.shape != (a.shape[1],) * 2 or not acc.flags.f_contiguous \
            or not acc.flags.writeable:
        raise ValueError(f"syrk_lower: need a writable Fortran-ordered float64 ({a.shape[-1]},)*2 sum for x of "
                         f"shape {a.shape}, got {acc.dtype} {acc.shape}")
    k, n = a.shape
    if n == 0 or k == 0:
        return
    i, one = ctypes.c_int, ctypes.c_double(1.0)
    _dsyrk()(b"L", b"T", ctypes.byref(i(n)), ctypes.byref(i(k)), ctypes.byref(one), a.ctypes.data,
             ctypes.byref(i(k)), ctypes.byref(one), acc.ctypes.data, ctypes.byref(i(n)))

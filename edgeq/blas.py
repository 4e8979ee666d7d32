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
they are given."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def one_blas_thread() -> Iterator[None]:
    import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS, so that the limit reaches it)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield

"""One BLAS thread while a build step runs: builds byte-identical across thread counts.

OpenBLAS's float32 GEMM does not give the same bits with one thread and with several on every
CPU (seen on an AMD EPYC, where OpenBLAS 0.3.31 picks its Haswell kernels: 1 vs 2 threads differ
in ~10 % of the outputs of a 32x576 @ 576x1536 product; float64 agreed). A reference-format
artifact's goldens (the reference runtime in float32) then changed in the 5th decimal with
``OMP_NUM_THREADS``. So every build step runs with the BLAS libraries numpy loaded held to one
thread (threadpoolctl), whatever the environment asks; edgeq's own worker threads
(``EDGEQ_THREADS``: quantizers, writers) are not affected, and the runtimes (verify, run,
profile) keep the threads they are given."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def one_blas_thread() -> Iterator[None]:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield

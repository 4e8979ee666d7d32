"""CPU seconds of one QERA compensation (edgeq.quant.compensate) with each whitening, side by side.

    python tools/bench_compensate.py [--out 2048] [--in 8192] [--rank 32]
        [--modes eigh+dense,cholesky+dense,cholesky+randomized]

A random error E (out x in) and a synthetic anisotropic input covariance (in/2 random samples with
log-normal column scales); one BLAS thread as in a build (edgeq.blas). A mode is a whitening
(``eigh``: the symmetric square root; ``cholesky``) and a way to the top singular triplets
(``dense``: a full SVD; ``randomized``: subspace iteration). Prints, per mode, the CPU seconds
(``time.process_time``) and the output error under C that the factors leave, which must agree
between the modes (the same optimum)."""
from __future__ import annotations

import argparse
import time

import numpy as np

import edgeq.quant.compensate as cm
from edgeq.blas import one_blas_thread


def run(out: int, k: int, rank: int, modes: list[str], seed: int = 0) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((max(k // 2, 1), k)).astype(np.float32) * np.exp(rng.standard_normal(k)).astype(np.float32)
    C = (X.T.astype(np.float64) @ X) / len(X)
    del X
    C += 1e-3 * np.eye(k) * np.mean(np.diag(C))
    E = rng.standard_normal((out, k)) * 0.01
    res = {}
    saved = cm.EIGH_MAX, cm.DENSE_SVD_MAX
    try:
        with one_blas_thread():
            for mode in modes:
                white, _, svd = mode.partition("+")
                cm.EIGH_MAX = 0 if white == "cholesky" else 1 << 30
                cm.DENSE_SVD_MAX = 0 if svd == "randomized" else 1 << 30
                t = time.process_time()
                a, b = cm.compensation(E, C, rank)
                dt = time.process_time() - t
                D = E - b.astype(np.float64) @ a.astype(np.float64)
                res[mode] = (dt, float(np.einsum("ij,jk,ik->", D, C, D)))
    finally:
        cm.EIGH_MAX, cm.DENSE_SVD_MAX = saved
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=2048)
    ap.add_argument("--in", dest="k", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--modes", default="eigh+dense,cholesky+dense,cholesky+randomized")
    a = ap.parse_args()
    for mode, (dt, err) in run(a.out, a.k, a.rank, a.modes.split(",")).items():
        print(f"{mode:<20} CPU {dt:8.1f} s   output error under C {err:.6e}", flush=True)


if __name__ == "__main__":
    main()

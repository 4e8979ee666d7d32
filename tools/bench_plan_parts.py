"""Issue 14, item 4: where one linear's planner measurement goes, the old computation vs the new.

    .venv/bin/python tools/bench_plan_parts.py OUT IN {old,new}

A random N(0, 0.02) weight (OUT x IN) and the covariance of 4096 anisotropic random activations;
for the 8 cpu-avx2 candidate types (ranks 16/32 below 6 bpw), process CPU seconds per part:
``old`` = eigh square root + float64 output error + float64 SVD of E S per type (the planner
before, ExactWhitener's computation); ``new`` = edgeq.quant.errcurve.Whitener. Prints one line.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from edgeq.plan import RANK_MAX_BPW, _quantized, _rtn_table
    from edgeq.quant import storage
    from edgeq.quant.compensate import sqrt_and_inv
    from edgeq.quant.errcurve import Whitener
    from edgeq.quant.gptq import output_error

    out, inn, method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    types = ["Q4_0", "Q8_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K", "F16"]
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((out, inn)) * 0.02).astype(np.float32)
    X = rng.standard_normal((4096, inn)).astype(np.float32) * np.exp(rng.standard_normal(inn)).astype(np.float32)
    cov = (X.T.astype(np.float64) @ X) / len(X)
    T: dict[str, float] = {}

    def tick(k, t0):
        T[k] = T.get(k, 0.0) + time.process_time() - t0

    t0 = time.process_time()
    if method == "new":
        wh = Whitener(cov)
    else:
        S, _ = sqrt_and_inv(cov, 1e-4)
    tick("whitening", t0)
    for t in types:
        info = storage.get(t)
        rr = [16, 32] if info.block_size > 1 and info.bits_per_weight() < RANK_MAX_BPW else []
        t0 = time.process_time()
        deq = _rtn_table(w, t) if info.block_size == 1 else _quantized(w, np.diag(cov), t, "rtn", 0.01, False).dequant
        tick("rtn " + t, t0)
        t0 = time.process_time()
        if method == "new":
            wh.curve(w - deq, rr)
        else:
            E = np.asarray(w, np.float64) - deq
            output_error(E, cov)
            if rr:
                np.linalg.svd(E @ S, compute_uv=False)
        tick("error + rank curve" if rr else "error", t0)
    print(out, inn, method, {k: round(v, 2) for k, v in T.items()}, "total", round(sum(T.values()), 1))


if __name__ == "__main__":
    main()

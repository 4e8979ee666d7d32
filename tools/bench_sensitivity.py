"""Issue 14, item 4: the planner's sensitivity estimates compared on SmolLM2-135M-Instruct.

    .venv/bin/python tools/bench_sensitivity.py [--layers 0,7,15,22,29] [--samples 16]

For every linear, the KL the model's next-token distribution gains when that tensor alone is
round-to-nearest quantized to the planner's reference type (the lowest-bpw candidate, Q4_0 on
cpu-avx2), on the build's probe sequences (the last 4 of 64 Alpaca calibration sequences, 128
tokens): the second-order Fisher estimate of every tensor at once (``--sensitivity fisher``) and
the exact KL by a tail re-run per tensor (``kl-probe``) on the tensors of ``--layers``. Prints one
JSON line: times, per-tensor pairs, ratio statistics and the Spearman rank correlation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = Path(os.environ.get("EDGEQ_SMOLLM2", REPO / "models" / "cache" / "smollm2-135m-instruct"))


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0,7,15,22,29")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--ref-type", default="Q4_0")
    a = ap.parse_args()
    from edgeq.calibrate import alpaca_token_sequences
    from edgeq.frontend import load_model
    from edgeq.ir import Role
    from edgeq.quant.reference import roundtrip
    from edgeq.quant.sensitivity import FISHER_SAMPLES, KLProbe

    samples = a.samples or FISHER_SAMPLES
    ir = load_model(MODEL)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=64, seq_len=256)
    probe = KLProbe(ir, [s[:128] for s in seqs[-4:]])
    roles = (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)
    quant = {}
    for i in range(ir.hparams.num_layers):
        for r in roles:
            w = np.asarray(ir.linear(i, r).weight, np.float32)
            quant[(i, r)] = roundtrip(w, a.ref_type).astype(np.float32)
    t = time.perf_counter()
    fisher = probe.fisher_kl({k: np.asarray(ir.linear(*k).weight, np.float32) - q for k, q in quant.items()},
                             samples=samples)
    t_fisher = time.perf_counter() - t
    layers = [int(x) for x in a.layers.split(",")]
    exact = {}
    t = time.perf_counter()
    for i in layers:
        for r in roles:
            exact[(i, r)] = probe.linear_kl(i, r, quant[(i, r)])
    t_exact = time.perf_counter() - t
    keys = list(exact)
    ex = np.array([exact[k] for k in keys])
    fi = np.array([fisher[k] for k in keys])
    ratio = fi / ex
    # the probe's cost for every tensor: each re-runs layers i..L-1 and the head
    L = ir.hparams.num_layers
    per_layer = {i: 0.0 for i in layers}
    for (i, r) in keys:
        per_layer[i] += 1
    print(json.dumps({
        "ref_type": a.ref_type, "samples": samples, "tensors_fisher": len(fisher), "fisher_s": round(t_fisher, 1),
        "exact_tensors": len(keys), "exact_s": round(t_exact, 1),
        "exact_all_tensors_est_s": round(t_exact * sum(L - i + 8 for i in range(L)) / sum(L - i + 8 for i in layers), 1),
        "ratio_median": float(np.median(ratio)), "ratio_p10": float(np.percentile(ratio, 10)),
        "ratio_p90": float(np.percentile(ratio, 90)), "spearman": spearman(ex, fi),
        "sum_exact": float(ex.sum()), "sum_fisher": float(fi.sum()),
        "pairs": {f"{i}.{r.value}": [float(exact[(i, r)]), float(fisher[(i, r)])] for (i, r) in keys},
    }))


if __name__ == "__main__":
    main()

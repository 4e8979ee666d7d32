"""Issue 14, item 4: the planner's per-tensor measurement, fast (edgeq.quant.errcurve.Whitener)
vs the dense reference (ExactWhitener: eigh square root + float64 SVD per candidate, what the
planner computed before), on the same calibration statistics.

    .venv/bin/python tools/bench_plan_cost.py [--model DIR] [--calib-samples 64] [--calib-len 256]
        [--layers 0,1] [--methods fast,exact] [--probe] [--bpw 5.5]

Calibrates ``--model`` (default SmolLM2-135M-Instruct) as a planned build does (Alpaca, same
sequences), then for each method measures the option table of the linears of ``--layers``
(default: all) with the cpu-avx2 candidate types and ranks, timing every tensor in process CPU
seconds. With both methods and all layers, it also solves the plan at ``--bpw`` from each table
(``--probe``: with the build's KL-probe gains, measured once and shared, since a gain is KL / the
reference type's error and both tables give that error to 1e-9) and prints how many tensors get
the same (type, rank) and the relative differences of the table entries. One JSON line.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    ap.add_argument("--methods", default="fast,exact")
    ap.add_argument("--probe", action="store_true", help="plans with the KL-probe gains (as a SmolLM2 build)")
    ap.add_argument("--bpw", type=float, default=None, help="plan budget (default: the target's default_bpw)")
    ap.add_argument("--target", default="cpu-avx2")
    a = ap.parse_args()

    from edgeq import plan as P
    from edgeq.calibrate import alpaca_token_sequences, calibrate
    from edgeq.frontend import load_model
    from edgeq.quant import errcurve
    from edgeq.targets import load_target

    ir = load_model(a.model)
    target = load_target(a.target)
    types = target.plan_types("gguf")
    ranks = target.plan_ranks
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=a.calib_samples, seq_len=a.calib_len)
    t = time.process_time()
    stats = calibrate(ir, seqs, progress=False)
    t_cal = time.process_time() - t
    layers = None if a.layers is None else {int(x) for x in a.layers.split(",")}
    shapes = P.plan_tensor_shapes(ir)
    names = [n for n in shapes if n.startswith("blk.") and (layers is None or ir.linears[n].layer in layers)]
    methods = {"fast": errcurve.Whitener, "exact": errcurve.ExactWhitener}
    out: dict = {"model": str(a.model), "calib_cpu_s": round(t_cal, 1), "types": list(types), "ranks": list(ranks),
                 "tensors": len(names)}
    errs: dict[str, dict] = {}
    for m in a.methods.split(","):
        per: dict[str, float] = {}
        table: dict = {}

        for layer in sorted({ir.linears[n].layer for n in names}):  # timed per layer (shared whitening)
            group = [n for n in names if ir.linears[n].layer == layer]
            t = time.process_time()
            tab = P.measure_options(ir, stats, types, ranks, "rtn", probe=None, progress=False,
                                    whitener=methods[m], linears=group, tables=False)
            per[f"layer {layer}"] = time.process_time() - t
            table.update({n: {o.choice: o.kl for o in tab[n]} for n in group})
        errs[m] = table
        out[f"{m}_cpu_s"] = round(sum(per.values()), 1)
        out[f"{m}_cpu_s_per_layer"] = {n: round(v, 2) for n, v in per.items()}
    if len(errs) == 2:
        f, e = errs["fast"], errs["exact"]
        rel = [abs(f[n][c] - e[n][c]) / max(e[n][c], 1e-30) for n in names for c in e[n]]
        out["rel_diff_median"] = float(np.median(rel))
        out["rel_diff_max"] = float(np.max(rel))
        if layers is None:
            gains = _probe_gains(ir, stats, seqs, types, errs["exact"]) if a.probe else {n: 1.0 for n in names}
            bpw = a.bpw if a.bpw is not None else target.plan_bpw
            budget = int(bpw * P.n_weights(ir) / 8)
            head = P.measure_options(ir, stats, types, ranks, "rtn", probe=None, progress=False, linears=[])
            plans = {}
            for m in ("fast", "exact"):
                tab = {n: [P.Option(c, P.choice_bytes(shapes[n], c), gains[n] * v) for c, v in errs[m][n].items()]
                       for n in names}
                tab.update({n: head[n] for n in head if not n.startswith("blk.")})
                plans[m] = P.solve(tab, budget)
            same = sum(plans["fast"][n].choice == plans["exact"][n].choice for n in plans["exact"])
            out.update(budget_bytes=budget, probe=a.probe, plan_tensors=len(plans["exact"]), plan_same=same,
                       plan_diff={n: [str(plans["exact"][n].choice), str(plans["fast"][n].choice)]
                                  for n in plans["exact"] if plans["fast"][n].choice != plans["exact"][n].choice},
                       predicted_kl={m: float(sum(o.kl for o in plans[m].values())) for m in plans})
    print(json.dumps(out))


def _probe_gains(ir, stats, seqs, types, exact):
    """The build's KL-probe gains (edgeq.quant.sensitivity.measure_gains): KL of each linear at
    the reference type / its exact layer error."""
    from edgeq import plan as P
    from edgeq.quant import storage
    from edgeq.quant.sensitivity import KLProbe, measure_gains

    quant_types = [t for t in types if storage.get(t).block_size > 1]
    ref = min(quant_types, key=lambda t: storage.get(t).bits_per_weight())
    probe = KLProbe(ir, [s[:min(len(s), 128)] for s in seqs[-4:]])
    ref_errs = {n: exact[n][P.Choice(ref, 0)] for n in exact}

    def perturbed(n):
        lin = ir.linears[n]
        cov = stats.layers[lin.layer].input_cov(lin.role)
        return P._quantized(np.asarray(lin.weight, np.float32), cov, ref, "rtn", 0.01, False).dequant

    return measure_gains(ir, ref_errs, perturbed, probe, progress=False)


if __name__ == "__main__":
    main()

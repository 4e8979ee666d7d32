"""Issue 6 kernel benchmark: generated fused dequant-GEMV + low-rank kernels on this CPU.

    .venv/bin/python tools/bench_kernels.py [--ranks 0,16,32] [--threads 2] [--repeat 7]
        [--target haswell] [--out out/bench-kernels]

SmolLM2-135M shapes (N outputs x K inputs): 576x576 (q, o), 192x576 (k, v), 1536x576 (gate, up),
576x1536 (down); int4, group 32, symmetric; decode (M = 1). Per shape and rank:

* ``fused``: the generated kernel with the low-rank branch in the same pass;
* ``base``: the same kernel without the branch (rank 0) — the branch's cost is fused / base;
* ``unfused``: base kernel, then the branch as two small numpy matmuls and an add (what a runtime
  without fused kernels does);
* ``numpy``: float32 numpy on pre-dequantized weights (``x @ W.T`` + the branch).

Each is timed two ways: ``hot`` — the same weights every call (``time_evaluator``; they sit in
the caches), and ``cold`` — rotating over enough copies of the weights to exceed the last-level
cache, so every call streams its weights from DRAM (the decode situation). Effective GB/s = bytes
the kernel must read (codes, scales, A, B, x) / time, next to this machine's measured memory
bandwidth (a large numpy copy: read + write bytes / time). Medians; writes OUT/results.json.

``--int8`` (issue 16): float-activation vs int8-activation kernels (``act="int8"``: x quantized
per group, integer dot products, :mod:`edgeq.kernels.tir_dot`), both compiled for ``--target``
(default there ``cascadelake``, the cpu-avx512 profile: AVX-512 VNNI; ``haswell``: AVX2's
``vpmaddubsw``), on the shapes above plus
the 8-bit head 49152x576, decode (M = 1) hot and cold, and one prefill call of ``--prefill-m``
rows hot (``--clock cpu``: process CPU time instead of wall time — with ``--threads 1`` the
measure that other load on a shared machine does not inflate); with each int8 kernel's error vs the float kernel's (max |Δ| / max |y|, random
weights and x ~ N(0, 1)). Writes OUT/results.json (default out/bench-kernels-int8).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
HEAD = (49152, 576)  # SmolLM2's tied embedding / head, int8
COLD_BYTES = 256 << 20  # weight copies per cold rotation: well above any LLC here


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def memory_bandwidth(repeat: int) -> float:
    """GB/s of a 512 MiB numpy copy (bytes read + written)."""
    a = np.ones(64 << 20, np.float64)
    b = np.empty_like(a)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t)
    return 2 * a.nbytes / statistics.median(ts) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="0,16,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--target", default=None,
                    help="LLVM mcpu (default haswell = the cpu-avx2 profile; with --int8 cascadelake = cpu-avx512)")
    ap.add_argument("--lr-dtype", default="float32", choices=["float32", "float16"],
                    help="storage of the low-rank factors")
    ap.add_argument("--out", type=Path, default=None, help="default out/bench-kernels[-fp16]")
    ap.add_argument("--int8", action="store_true", help="float vs int8-activation kernels (see above)")
    ap.add_argument("--prefill-m", type=int, default=64, help="--int8: rows of the prefill call")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="--int8: time per call as wall or process CPU time (cpu with --threads 1 is robust to "
                         "other load on the machine)")
    a = ap.parse_args()
    if a.int8:
        sys.path.insert(0, str(REPO / "tools"))
        from bench_int8 import compare  # noqa: E402

        a.target = a.target or "cascadelake"
        return compare(a, log, memory_bandwidth, COLD_BYTES, SHAPES + [HEAD])
    a.target = a.target or "haswell"
    if a.out is None:
        a.out = REPO / "out" / ("bench-kernels" + ("-fp16" if a.lr_dtype == "float16" else ""))
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    import tvm

    from edgeq.kernels import compile as kc
    from edgeq.kernels import layout
    from edgeq.kernels.spec import KernelSpec
    from edgeq.quant.intgroup import rtn_int

    ranks = [int(r) for r in a.ranks.split(",")]
    target = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": a.target}
    block = kc.kernel_block(target)
    specs = {r: KernelSpec(bits=4, group=32, rank=r, block=block, lr_dtype=a.lr_dtype) for r in sorted(set(ranks) | {0})}
    t = time.perf_counter()
    ex = kc.build(specs.values(), target)
    log(f"compiled {len(specs)} kernels for {a.target} in {time.perf_counter() - t:.1f} s")
    dev = tvm.cpu()
    bw = memory_bandwidth(a.repeat)
    log(f"memory bandwidth (numpy copy): {bw:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    for n, k in SHAPES:
        w = rng.standard_normal((n, k)).astype(np.float32)
        q = rtn_int(w, "int4_g32_sym")
        x = rng.standard_normal((1, k)).astype(np.float32)
        deq = q.dequantize()
        for r in ranks:
            spec = specs[r]
            arrays = layout.pack_weight(q.codes, q.scales, None, spec)
            if r:
                arrays.update(layout.pack_low_rank(rng.standard_normal((r, k)).astype(np.float32) * 0.05,
                                                   rng.standard_normal((n, r)).astype(np.float32) * 0.05, spec))
            base_arrays = {kk: v for kk, v in arrays.items() if kk in ("qw", "sc")}
            nbytes = sum(v.nbytes for v in arrays.values()) + x.nbytes
            y = np.zeros((1, n), np.float32)

            def tensors(spec_, arr):
                return [tvm.runtime.tensor(v, dev) for v in [x] + [arr[kk] for kk in spec_.args()[1:-1]] + [y]]

            def hot(spec_, arr):
                f = ex.mod.time_evaluator(spec_.name, dev, number=200, repeat=a.repeat)
                return statistics.median(f(*tensors(spec_, arr)).results)

            def cold(call_for_copy, n_copies):
                ts = []
                for _ in range(a.repeat):
                    t0 = time.perf_counter()
                    for c in range(n_copies):
                        call_for_copy(c)
                    ts.append((time.perf_counter() - t0) / n_copies)
                return statistics.median(ts)

            n_copies = max(8, COLD_BYTES // nbytes)
            copies = [tensors(spec, {kk: v.copy() for kk, v in arrays.items()}) for _ in range(n_copies)]
            base_copies = [tensors(specs[0], {kk: v.copy() for kk, v in base_arrays.items()}) for _ in range(n_copies)]
            f_spec, f_base = ex[spec.name], ex[specs[0].name]
            at = np.ascontiguousarray(layout.unpack_low_rank(arrays, spec)[0].T, np.float32) if r else None
            bt = np.ascontiguousarray(layout.unpack_low_rank(arrays, spec)[1].T, np.float32) if r else None
            at_copies = [(at.copy(), bt.copy()) for _ in range(n_copies)] if r else None
            deq_copies = [deq.copy() for _ in range(max(2, COLD_BYTES // deq.nbytes))]

            def unfused(c):
                f_base(*base_copies[c])
                if r:
                    aa, bb = at_copies[c]
                    return base_copies[c][-1].numpy() + (x @ aa) @ bb
                return None

            def numpy_call(c):
                yy = x @ deq_copies[c % len(deq_copies)].T
                if r:
                    aa, bb = at_copies[c % n_copies]
                    yy = yy + (x @ aa) @ bb
                return yy

            row = {"shape": f"{n}x{k}", "rank": r, "bytes": nbytes,
                   "fused_hot_us": hot(spec, arrays) * 1e6, "base_hot_us": hot(specs[0], base_arrays) * 1e6,
                   "fused_cold_us": cold(lambda c: f_spec(*copies[c]), n_copies) * 1e6,
                   "base_cold_us": cold(lambda c: f_base(*base_copies[c]), n_copies) * 1e6,
                   "unfused_cold_us": cold(unfused, n_copies) * 1e6,
                   "numpy_cold_us": cold(numpy_call, n_copies) * 1e6}
            row["fused_cold_gb_s"] = nbytes / row["fused_cold_us"] / 1e3
            row["branch_cost_cold"] = row["fused_cold_us"] / row["base_cold_us"] - 1
            row["branch_cost_hot"] = row["fused_hot_us"] / row["base_hot_us"] - 1
            row["unfused_cost_cold"] = row["unfused_cold_us"] / row["base_cold_us"] - 1
            rows.append(row)
            log(f"{n}x{k} r{r}: fused {row['fused_cold_us']:.1f} us cold / {row['fused_hot_us']:.1f} hot, "
                f"base {row['base_cold_us']:.1f} / {row['base_hot_us']:.1f}, unfused {row['unfused_cold_us']:.1f}, "
                f"numpy {row['numpy_cold_us']:.1f}")
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"command": " ".join(sys.argv), "threads": a.threads, "target": target, "block": block,
           "lr_dtype": a.lr_dtype,
           "memory_bandwidth_gb_s": bw, "rows": rows}
    (a.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))


def table(res: dict) -> str:
    lines = [f"memory bandwidth (numpy copy, read + write): {res['memory_bandwidth_gb_s']:.1f} GB/s; "
             f"{res['threads']} threads, target {res['target']['mcpu']}, block {res['block']}, "
             f"low-rank factors {res.get('lr_dtype', 'float32')}", "",
             "| shape (N x K) | rank | fused cold µs | base cold µs | branch cost cold | unfused cold µs | unfused cost "
             "| numpy µs | fused GB/s | fused hot µs | base hot µs | branch cost hot |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['rank']} | {r['fused_cold_us']:.1f} | {r['base_cold_us']:.1f} | "
                     f"{r['branch_cost_cold'] * 100:+.0f} % | {r['unfused_cold_us']:.1f} | {r['unfused_cost_cold'] * 100:+.0f} % | "
                     f"{r['numpy_cold_us']:.1f} | {r['fused_cold_gb_s']:.1f} | {r['fused_hot_us']:.1f} | "
                     f"{r['base_hot_us']:.1f} | {r['branch_cost_hot'] * 100:+.0f} % |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""``tools/bench_kernels.py --int8``: float-activation vs int8-activation kernels on this CPU
(issue 16; see bench_kernels.py's docstring). Not run on its own."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np


def compare(a, log, memory_bandwidth, cold_bytes: int, shapes) -> None:
    clock = time.process_time if a.clock == "cpu" else time.perf_counter

    def timed(call, number: int, repeat: int) -> float:
        """Median over ``repeat`` of the per-call µs of ``number`` calls (CPU or wall clock)."""
        call()
        ts = []
        for _ in range(repeat):
            t1 = clock()
            for _ in range(number):
                call()
            ts.append((clock() - t1) / number)
        return statistics.median(ts) * 1e6

    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    import tvm

    from edgeq.kernels import compile as kc
    from edgeq.kernels import layout
    from edgeq.kernels.spec import KernelSpec
    from edgeq.quant.intgroup import rtn_int

    target = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": a.target}
    isa = kc.dot_isa(target)
    if isa is None:
        sys.exit(f"error: target {a.target} has no integer dot instruction (AVX-512 VNNI / AVX-VNNI)")
    block = kc.kernel_block(target)
    ranks = [int(r) for r in a.ranks.split(",")]
    specs = {}
    for bits in (4, 8):
        for r in ranks:
            for act in ("float32", "int8"):
                for prefill in (False, True):
                    s = KernelSpec(bits=bits, group=32, rank=r, block=block, lr_dtype=a.lr_dtype, act=act,
                                   prefill=prefill)
                    specs[(bits, r, act, prefill)] = s
    t0 = time.perf_counter()
    ex = kc.build(specs.values(), target)
    log(f"compiled {len(specs)} kernels for {a.target} ({isa}) in {time.perf_counter() - t0:.1f} s")
    dev = tvm.cpu()
    bw = memory_bandwidth(a.repeat)
    rng = np.random.default_rng(0)
    rows = []
    for n, k in shapes:
        bits = 8 if (n, k) == shapes[-1] else 4
        w = rng.standard_normal((n, k)).astype(np.float32)
        q = rtn_int(w, f"int{bits}_g32_sym")
        for r in (ranks if bits == 4 else [0]):
            lr = (rng.standard_normal((r, k)).astype(np.float32) * 0.05,
                  rng.standard_normal((n, r)).astype(np.float32) * 0.05) if r else None
            row = {"shape": f"{n}x{k}", "bits": bits, "rank": r}
            outs = {}
            for act in ("float32", "int8"):
                spec = specs[(bits, r, act, False)]
                arrays = layout.pack_weight(q.codes, q.scales, None, spec)
                if r:
                    arrays.update(layout.pack_low_rank(*lr, spec))
                x = rng.standard_normal((1, k)).astype(np.float32) if act == "float32" else x
                nbytes = sum(v.nbytes for v in arrays.values())

                def tensors(xx, arr=arrays, spec=spec):
                    ys = np.zeros((xx.shape[0], n), np.float32)
                    return [tvm.runtime.tensor(v, dev) for v in [xx] + [arr[kk] for kk in spec.args()[1:-1]] + [ys]]

                ts = tensors(x)
                f = ex[spec.name]
                f(*ts)
                outs[act] = ts[-1].numpy()
                number = max(5, 200 * 576 * 576 // (n * k))
                row[f"{act}_hot_us"] = timed(lambda: f(*ts), number, a.repeat)
                n_copies = max(8, cold_bytes // nbytes)
                copies = [tensors(x, {kk: v.copy() for kk, v in arrays.items()}) for _ in range(n_copies)]
                it = iter(range(1 << 62))
                row[f"{act}_cold_us"] = timed(lambda: f(*copies[next(it) % n_copies]), n_copies, a.repeat)
                del copies
                pspec = specs[(bits, r, act, True)]
                tp = tensors(rng.standard_normal((a.prefill_m, k)).astype(np.float32))
                row[f"{act}_prefill_us"] = timed(lambda: ex[pspec.name](*tp), 3, a.repeat)
                row["weight_bytes"] = nbytes
            ref = outs["float32"]
            row["int8_rel_err"] = float(np.abs(outs["int8"] - ref).max() / np.abs(ref).max())
            for m in ("hot", "cold", "prefill"):
                row[f"speedup_{m}"] = row[f"float32_{m}_us"] / row[f"int8_{m}_us"]
            rows.append(row)
            log(f"{n}x{k} int{bits} r{r}: cold {row['float32_cold_us']:.1f} -> {row['int8_cold_us']:.1f} us, "
                f"hot {row['float32_hot_us']:.1f} -> {row['int8_hot_us']:.1f}, prefill M={a.prefill_m} "
                f"{row['float32_prefill_us']:.0f} -> {row['int8_prefill_us']:.0f}, rel err {row['int8_rel_err']:.2e}")
    out = a.out if a.out is not None else __import__("pathlib").Path("out/bench-kernels-int8")
    out.mkdir(parents=True, exist_ok=True)
    res = {"command": " ".join(sys.argv), "threads": a.threads, "clock": a.clock, "target": target, "isa": isa, "block": block,
           "prefill_m": a.prefill_m, "memory_bandwidth_gb_s": bw, "rows": rows}
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))


def table(res: dict) -> str:
    m = res["prefill_m"]
    lines = [f"memory bandwidth (numpy copy, read + write): {res['memory_bandwidth_gb_s']:.1f} GB/s; "
             f"{res['threads']} threads, target {res['target']['mcpu']} ({res['isa']}), block {res['block']}; "
             f"{res['clock']} time per call", "",
             f"| shape (N x K) | bits | rank | float cold µs | int8 cold µs | × | float hot µs | int8 hot µs | × | "
             f"float prefill M={m} µs | int8 prefill µs | × | int8 rel. err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['bits']} | {r['rank']} | {r['float32_cold_us']:.1f} | {r['int8_cold_us']:.1f} | "
                     f"{r['speedup_cold']:.2f} | {r['float32_hot_us']:.1f} | {r['int8_hot_us']:.1f} | "
                     f"{r['speedup_hot']:.2f} | {r['float32_prefill_us']:.0f} | {r['int8_prefill_us']:.0f} | "
                     f"{r['speedup_prefill']:.2f} | {r['int8_rel_err']:.1e} |")
    return "\n".join(lines)

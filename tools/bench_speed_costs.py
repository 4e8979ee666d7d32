"""Measure the planner's decode-speed cost table for llama.cpp on this host (issue 16, item 4).

    .venv/bin/python tools/bench_speed_costs.py [--model models/cache/smollm2-135m-instruct]
        [--target cpu-avx2] [--rounds 5] [--tokens 64] [--threads 2] [--clock cpu|wall]
        [--out out/bench-speed-costs] [--write]

One GGUF per candidate storage type of the profile (every 2-D weight in that type where its row
length allows, the rest Q8_0; written by edgeq's own GGUF writer, round-to-nearest), plus the
Q4_0 file with a random fp16 low-rank branch of rank 16 and of rank 32 on every block linear
(a LoRA GGUF, as a planned build ships its compensation). Decode: "Once upon a time" + N greedy
tokens in llama.cpp, one warm-up, then ``--rounds`` rounds with every configuration interleaved
(A B C ... per round); medians of the process CPU seconds per generated token (``--clock cpu``,
the default: on a shared machine wall time measures the other jobs; with ``--threads 1`` llama.cpp
computes in this process's one thread) or of llama.cpp's decode wall time (``--clock wall``). The fit (edgeq.quant.speed): seconds per token = the sum over
the weights a token multiplies of their type's cost, with the per-token overhead spread over the
weights (exact for mixes on the measured model; see the module's docstring):

* all-Q8_0 file: c(Q8_0) = t(Q8_0) / N;
* type T on N_T of the N weights, Q8_0 on the rest: c(T) = c(Q8_0) + (t(T) - t(Q8_0)) / N_T;
* branches: t(rank r) - t(Q4_0) = L * call + r * S * p over the L branched linears
  (S = sum of their in + out), solved from r = 16 and 32 for the per-call cost and the cost per
  branch parameter (clamped at 0).

Prints and writes OUT/results.json; ``--write`` also stores the fit as the profile's ``gguf``
entry of edgeq/quant/speed_costs.json (what the planner reads).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "Once upon a time"
RANKS = (16, 32)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_files(ir, types, out: Path) -> dict:
    from edgeq.backends.gguf import lower as lg
    from edgeq.ir import LowRank
    from edgeq.quant import storage
    from edgeq.quant.speed import matmul_weights

    counted = matmul_weights(ir.hparams)
    files, counts = {}, {}
    for t in types:
        plan = {n: (t if shape[1] % storage.get(t).block_size == 0 else "Q8_0") for n, shape in counted.items()}
        counts[t] = sum(a * b for n, (a, b) in counted.items() if plan[n] == t and n in counted)
        p = out / f"{t}.gguf"
        if not p.exists():
            log(f"writing {p.name}")
            tt = lg.tensor_types(ir, 32)
            tt.update(plan)
            lg.write_gguf(ir, p, tt)
        files[t] = (p, [])
    rng = np.random.default_rng(0)
    branch = {"linears": 0, "in_plus_out": 0}
    for r in RANKS:
        lora = out / f"lora-r{r}.gguf"
        linears = {}
        for name, lin in ir.linears.items():
            o, i = lin.weight.shape
            a = (rng.standard_normal((r, i)) * 0.01).astype(np.float32)
            b = (rng.standard_normal((o, r)) * 0.01).astype(np.float32)
            linears[name] = dataclasses.replace(lin, low_rank=(LowRank(a, b, 1.0, "qerr"),))
        branch = {"linears": len(linears), "in_plus_out": sum(sum(x.weight.shape) for x in linears.values())}
        if not lora.exists():
            log(f"writing {lora.name}")
            lg.write_lora_gguf(ir.replace(linears=linears), "qerr", lora, dtype="F16")
        files[f"Q4_0+r{r}"] = (out / "Q4_0.gguf", [lora])
    return {"files": files, "counts": counts, "branch": branch, "n": sum(a * b for a, b in counted.values())}


def decode(files: dict, rounds: int, tokens: int, threads: int, clock: str = "cpu") -> dict[str, list[float]]:
    from runtimes.llamacpp import LlamaCppSession

    sess = {k: LlamaCppSession(m, lora_paths=l, n_ctx=512, n_threads=threads) for k, (m, l) in files.items()}
    res: dict[str, list[float]] = {k: [] for k in sess}
    try:
        ids = {k: s.tokenize(PROMPT) for k, s in sess.items()}
        for k, s in sess.items():
            list(s.generate_ids(ids[k], tokens, stop_at_eos=False))
        for r in range(rounds):
            for k, s in sess.items():
                c0 = time.process_time()
                list(s.generate_ids(ids[k], tokens, stop_at_eos=False))
                cpu = (time.process_time() - c0) / tokens
                res[k].append(cpu if clock == "cpu" else 1.0 / s.last_stats.decode_tok_s)
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f}" for k, v in res.items()) + " ms/token")
    finally:
        for s in sess.values():
            s.close()
    return res


def fit(built: dict, secs: dict[str, float]) -> dict:
    n, counts = built["n"], built["counts"]
    c8 = secs["Q8_0"] / n
    per_weight = {t: c8 + (secs[t] - secs["Q8_0"]) / counts[t] for t in counts if counts[t]}
    per_weight["Q8_0"] = c8
    L, S = built["branch"]["linears"], built["branch"]["in_plus_out"]
    d16, d32 = (secs[f"Q4_0+r{r}"] - secs["Q4_0"] for r in RANKS)
    p_raw = (d32 - d16) / ((RANKS[1] - RANKS[0]) * S)
    p = max(p_raw, 0.0)
    call_raw = (d16 - RANKS[0] * S * p) / L
    return {"seconds_per_weight": {k: per_weight[k] for k in sorted(per_weight)},
            "branch_call_s": max(call_raw, 0.0), "branch_s_per_param": p,
            "raw": {"branch_call_s": call_raw, "branch_s_per_param": p_raw}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cache" / "smollm2-135m-instruct")
    ap.add_argument("--target", default="cpu-avx2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-speed-costs")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: process CPU seconds per generated token (prompt included; robust on a shared machine, "
                         "use with --threads 1); wall: llama.cpp's decode seconds per token")
    ap.add_argument("--write", action="store_true", help="store the fit in edgeq/quant/speed_costs.json")
    args = ap.parse_args(argv)
    from edgeq.frontend import load_model
    from edgeq.quant.speed import store_measured
    from edgeq.targets import load_target

    target = load_target(args.target)
    types = [t for t in target.plan_types("gguf")]
    if "Q8_0" not in types or "Q4_0" not in types:
        raise SystemExit("the profile's GGUF candidates must include Q8_0 and Q4_0 (the fit's anchors)")
    args.out.mkdir(parents=True, exist_ok=True)
    ir = load_model(args.model)
    built = build_files(ir, types, args.out)
    runs = decode(built["files"], args.rounds, args.tokens, args.threads, args.clock)
    secs = {k: statistics.median(v) for k, v in runs.items()}
    table = fit(built, secs)
    import llama_cpp

    entry = dict(table, profile=target.name, backend="gguf", source="measured", clock=args.clock,
                 runtime=f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", threads=args.threads,
                 host=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"),
                 model=args.model.name, command="tools/bench_speed_costs.py " + " ".join(argv or sys.argv[1:]))
    res = {"entry": entry, "seconds_per_token": secs, "runs": runs, "counts": built["counts"], "n": built["n"],
           "branch": built["branch"]}
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    print("| config | decode tok/s (median) | s/token |")
    print("|---|---|---|")
    for k, v in secs.items():
        print(f"| {k} | {1 / v:.1f} | {v * 1e3:.3f} ms |")
    print(json.dumps(entry, indent=1))
    if args.write:
        store_measured(entry)
        log("stored in edgeq/quant/speed_costs.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 2 benchmark: edgeq's GGUF (Q8_0 / Q4_0) vs llama.cpp's own `llama_model_quantize`
of the same fp32 model, side by side in one run.

    .venv/bin/python tools/bench_gguf.py [--model DIR] [--out DIR] [--ppl-tokens 16384] [--runs 5]

For each of F32, edgeq Q8_0, llama.cpp Q8_0, edgeq Q4_0, llama.cpp Q4_0: file size, whether
the tensor data equals llama.cpp's byte for byte, wikitext-2 test perplexity (protocol of
../shared/design/BENCHMARK_PROTOCOL.md: ctx 512, second half of each window scored), decode
tok/s (128 greedy tokens from "Once upon a time", 1 warm-up, median of N runs taken A B A B),
and build time. Writes JSON next to the artifacts and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeq.build import BuildOptions, build  # noqa: E402
from edgeq.evaluate import perplexity, wikitext2_test_text  # noqa: E402
from edgeq.frontend import load_model  # noqa: E402
from edgeq.backends.gguf import lower as lower_gguf  # noqa: E402
from runtimes.llamacpp import LlamaCppSession  # noqa: E402
from llamacpp_quantize import compare_gguf, llamacpp_quantize  # noqa: E402

DECODE_PROMPT = "Once upon a time"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def decode_runs(paths: dict[str, Path], runs: int, threads: int, n_tokens: int = 128) -> dict[str, list[float]]:
    sessions = {k: LlamaCppSession(p, n_ctx=512, n_threads=threads) for k, p in paths.items()}
    res: dict[str, list[float]] = {k: [] for k in paths}
    try:
        ids = {k: s.tokenize(DECODE_PROMPT) for k, s in sessions.items()}
        for k, s in sessions.items():  # warm-up
            list(s.generate_ids(ids[k], n_tokens, stop_at_eos=False))
        for r in range(runs):  # A B A B ...
            for k, s in sessions.items():
                list(s.generate_ids(ids[k], n_tokens, stop_at_eos=False))
                res[k].append(s.last_stats.decode_tok_s)
            log(f"  decode run {r + 1}/{runs}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in res.items()))
    finally:
        for s in sessions.values():
            s.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cache" / "smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-gguf")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-only", action="store_true",
                    help="re-measure decode speed of the files of a previous run (OUT/results.json)")
    args = ap.parse_args(argv)
    if args.decode_only:
        return decode_only(args)
    if not (args.model / "config.json").exists():
        from models.smollm2 import materialise_smollm2

        materialise_smollm2(args.model)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}

    # fp32 GGUF of the same model: the input of llama.cpp's quantizer
    log("writing F32 GGUF")
    ir = load_model(args.model)
    f32 = out / "f32.gguf"
    t = time.perf_counter()
    lower_gguf.write_gguf(ir, f32, lower_gguf.tensor_types(ir, 32))
    rows["F32"] = {"path": f32, "build_s": time.perf_counter() - t, "who": "edgeq (F32 container)"}
    del ir

    for q, bits in (("Q8_0", 8), ("Q4_0", 4)):
        log(f"edgeq build --bits {bits}")
        res = build(BuildOptions(model=args.model, out=out / f"edgeq-{q}", bits=bits, force=True), log=log)
        rows[f"edgeq {q}"] = {"path": out / f"edgeq-{q}" / "model.gguf", "build_s": res.seconds,
                              "build_timings": res.timings, "who": "edgeq build"}
        log(f"llama_model_quantize {q}")
        dst = out / f"llamacpp-{q}.gguf"
        secs = llamacpp_quantize(f32, dst, q, args.threads)
        rows[f"llama.cpp {q}"] = {"path": dst, "build_s": secs, "who": "llama_model_quantize (from F32 GGUF)"}
        c = compare_gguf(rows[f"edgeq {q}"]["path"], dst)
        rows[f"edgeq {q}"]["identical_tensors"] = f"{c['identical_tensors']}/{c['tensors']}"

    log("tokenizing wikitext-2 test")
    text = wikitext2_test_text()
    for name, r in rows.items():
        r["bytes"] = r["path"].stat().st_size
        with LlamaCppSession(r["path"], n_ctx=512, n_threads=args.threads) as s:
            toks = s.tokenize(text, add_special=False)
            t = time.perf_counter()
            p = perplexity(s, toks, ctx=512, max_tokens=args.ppl_tokens)
            r["ppl"] = p.ppl
            r["scored_tokens"] = p.scored_tokens
            r["ppl_s"] = time.perf_counter() - t
        log(f"  {name}: ppl {p.ppl:.4f} over {p.scored_tokens} tokens")

    log("decode speed (A B A B ...)")
    speeds = decode_runs({k: r["path"] for k, r in rows.items()}, args.runs, args.threads)
    for k, v in speeds.items():
        rows[k]["decode_tok_s_runs"] = v
        rows[k]["decode_tok_s"] = statistics.median(v)

    return report(rows, args)


def decode_only(args) -> int:
    prev = json.loads((args.out / "results.json").read_text())
    rows = {k: dict(r, path=Path(r["path"])) for k, r in prev["rows"].items()}
    log(f"decode speed only, {args.runs} runs (A B A B ...)")
    speeds = decode_runs({k: r["path"] for k, r in rows.items()}, args.runs, args.threads)
    for k, v in speeds.items():
        rows[k]["decode_tok_s_runs"] = v
        rows[k]["decode_tok_s"] = statistics.median(v)
    return report(rows, args)


def report(rows: dict, args) -> int:
    import llama_cpp

    meta = {"date": time.strftime("%Y-%m-%d"), "host": platform.processor() or platform.machine(),
            "threads": args.threads, "llama_cpp_python": llama_cpp.__version__,
            "ppl_tokens": args.ppl_tokens, "runs": args.runs, "model": str(args.model)}
    result = {"meta": meta, "rows": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in r.items()}
                                     for k, r in rows.items()}}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))

    print(f"\n{json.dumps(meta)}\n")
    print("| model file | by | size MB | tensors = llama.cpp | wikitext-2 ppl | decode tok/s | vs llama.cpp | build s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        q = name.split()[-1]
        ratio = ""
        if name.startswith("edgeq"):
            ratio = f"{r['decode_tok_s'] / rows[f'llama.cpp {q}']['decode_tok_s']:.3f}x speed, " \
                    f"ppl {100 * (r['ppl'] / rows[f'llama.cpp {q}']['ppl'] - 1):+.3f}%, " \
                    f"size {r['bytes'] / rows[f'llama.cpp {q}']['bytes']:.4f}x"
        print(f"| {name} | {r['who']} | {r['bytes'] / 1e6:.1f} | {r.get('identical_tensors', '')} | "
              f"{r['ppl']:.3f} | {r['decode_tok_s']:.1f} | {ratio} | {r['build_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

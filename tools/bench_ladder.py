"""Issue 15: the carried pruning rates on a quality-vs-speed plot beside llama.cpp's quantization
ladder, all measured side by side in one run.

    PYTHONPATH=. EDGEQ_DATA=../shared/data .venv/bin/python tools/bench_ladder.py \\
        [--model models/cache/smollm2-135m-instruct] [--types Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M] \\
        [--formats gguf,onnx,tvm] [--rates 0,0.15,0.25] \\
        [--edgeq-args "--bits 4 --prune-dims mlp --prune-bias"] [--ppl-tokens 16384] \\
        [--decode-runs 5] [--decode-tokens 128] [--out out/bench-ladder] [--stage all|decode]

The ladder: an F32 GGUF of ``--model`` (edgeq's lowering, as tools/bench_quant.py), then each
``--types`` file from llama.cpp's own ``llama_model_quantize`` (no imatrix). The rates: one
``edgeq build --prune-rates RATES EDGEQ_ARGS`` artifact per ``--formats`` entry (cpu-avx2), each
rate opened with ``edgeq.session.open_session(prune=R)`` (GGUF: the rate's own file; ONNX / TVM:
the one stored model, switched).

Every point is measured with the same code: wikitext-2 perplexity (ctx 512, second half scored),
KL(fp32 reference || point) and top-1 agreement on the same positions -- the reference is the
unpruned model in float32 in edgeq's numpy reference runtime, its logits computed once and
cached -- and decode tok/s (``--decode-tokens`` greedy tokens after "Once upon a time", one
warm-up each, then ``--decode-runs`` rounds in which every point runs once in turn, median; each
point in a fresh process of its own).

For each rate point the table gives the ladder's KL at the same decode speed (linear between the
two ladder points that bracket its speed; none outside the ladder's range): a rate is worth
carrying where its KL is below that, or not much above it.
Writes OUT/results.json, OUT/ladder.svg (matplotlib, when installed) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import DECODE_PROMPT, CachedLogits, llamacpp_quantize, log  # noqa: E402

DEFAULT_TYPES = "Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M"


def ladder_kl_at(speed: float, ladder: list[tuple[float, float]]) -> float | None:
    """The ladder's KL at decode speed ``speed``: linear between the two (tok/s, KL) points that
    bracket it (the ladder is not assumed monotone: the nearest bracketing pair by speed); None
    outside the ladder's speed range."""
    pts = sorted(ladder)
    if not pts or speed < pts[0][0] or speed > pts[-1][0]:
        return None
    for (s0, k0), (s1, k1) in zip(pts, pts[1:]):
        if s0 <= speed <= s1:
            return k0 if s1 == s0 else k0 + (k1 - k0) * (speed - s0) / (s1 - s0)
    return pts[-1][1]  # a single point equal to speed


def build_ladder(args, out: Path) -> list[dict]:
    from edgeq.backends.gguf import lower as lower_gguf
    from edgeq.backends.reference.ir_files import write_ir
    from edgeq.frontend import load_model

    ir = load_model(args.model)
    f32 = out / "f32.gguf"
    if not f32.exists():
        log("writing the F32 GGUF and the fp32 reference IR")
        lower_gguf.write_gguf(ir, f32, lower_gguf.tensor_types(ir, 32))
        (out / "fp32-ir").mkdir(exist_ok=True)
        write_ir(ir, out / "fp32-ir")
    rows = []
    for ft in args.types:
        dst = out / f"llamacpp-{ft}.gguf"
        if not dst.exists():
            llamacpp_quantize(f32, dst, ft, args.threads)
        rows.append({"who": "llama.cpp", "format": "gguf", "point": ft, "path": str(dst), "rate": None,
                     "bytes": dst.stat().st_size})
    return rows


def build_rates(args, out: Path) -> list[dict]:
    rows = []
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for fmt in args.formats:
        art = out / f"edgeq-{fmt}"
        if not (art / "manifest.json").exists():
            cmd = [sys.executable, "-m", "edgeq.cli", "build", str(args.model), "--target", args.target,
                   "--format", fmt, "--prune-rates", ",".join(f"{r:g}" for r in args.rates),
                   *shlex.split(args.edgeq_args), "-o", str(art), "--force"]
            log("$ " + " ".join(cmd))
            t = time.perf_counter()
            subprocess.run(cmd, env=env, check=True)
            log(f"built {art.name} in {time.perf_counter() - t:.0f}s")
        m = json.loads((art / "manifest.json").read_text())
        files = {k: int(v["bytes"]) for k, v in m["files"].items()}
        for r in args.rates:
            if fmt == "gguf":  # one file per rate: that rate's file
                from edgeq.artifact import gguf_file_for_rate

                size = files[gguf_file_for_rate(m, r)]
            else:  # the one stored model that carries every rate (goldens and the like left out)
                size = sum(v for k, v in files.items() if not k.endswith(".json"))
            rows.append({"who": "edgeq", "format": fmt, "point": f"{fmt} rate {r:g}", "path": str(art), "rate": r,
                         "bytes": size})
    return rows


def open_point(row: dict, args, n_ctx: int):
    if row["who"] == "llama.cpp":
        from runtimes.llamacpp import LlamaCppSession

        return LlamaCppSession(row["path"], n_ctx=n_ctx, n_threads=args.threads)
    from edgeq.session import open_session

    return open_session(row["path"], n_ctx=n_ctx, threads=args.threads, prune=row["rate"])


def evaluate(rows: list[dict], args, out: Path) -> float:
    from edgeq.backends.reference.ir_files import read_ir
    from edgeq.evaluate import evaluate_wikitext, wikitext2_test_text
    from runtimes.reference import ReferenceSession

    ref = CachedLogits(ReferenceSession(read_ir(out / "fp32-ir"), n_ctx=args.ctx), out / "ref-logits")
    text = wikitext2_test_text()
    tokens = list(ref.tokenize(text, add_special=False))
    ref_ppl = None
    for r in rows:
        if "kl" in r:
            continue
        s = open_point(r, args, n_ctx=2048)
        try:
            t = time.perf_counter()
            w = evaluate_wikitext(s, ref, tokens=tokens, ctx=args.ctx, max_tokens=args.ppl_tokens)
            r.update(ppl=w.perplexity.ppl, scored=w.perplexity.scored_tokens, kl=w.kl.mean_kl,
                     kl_p99=w.kl.p99_kl, top1=w.kl.top1_agreement, eval_s=time.perf_counter() - t)
            ref_ppl = w.reference_perplexity.ppl
        finally:
            s.close()
        log(f"{r['point']}: ppl {r['ppl']:.3f} KL {r['kl']:.4f} top-1 {r['top1']:.3f} ({r['eval_s']:.0f}s)")
        (out / "results.json").write_text(json.dumps({"rows": rows}, indent=1))
    return ref_ppl


def decode_code(row: dict, args) -> str:
    """The child process's snippet: open the point, one warm-up, one timed generation; prints JSON.
    (It opens the session as :func:`open_point` does, written out rather than imported: importing
    this tool would load bench_quant's module graph, llama.cpp included, into every timed process.)"""
    if row["who"] == "llama.cpp":
        opener = (f"from runtimes.llamacpp import LlamaCppSession\n"
                  f"s = LlamaCppSession({row['path']!r}, n_ctx=512, n_threads={args.threads})")
    else:
        opener = (f"from edgeq.session import open_session\n"
                  f"s = open_session({row['path']!r}, n_ctx=512, threads={args.threads}, prune={row['rate']!r})")
    return (f"import json\n{opener}\n"
            f"x = s.tokenize({DECODE_PROMPT!r})\n"
            f"list(s.generate_ids(x, {args.decode_tokens}, stop_at_eos=False))\n"
            f"list(s.generate_ids(x, {args.decode_tokens}, stop_at_eos=False))\n"
            f"print(json.dumps(s.last_stats.decode_tok_s))\n")


def decode(rows: list[dict], args) -> None:
    """Each point in a fresh process of its own, as tools/bench_onnx.py measures (no other
    session's thread pool or memory in the timed process); ``--decode-runs`` rounds, every point
    once per round in turn (A B C A B C ...), median. Run it on a quiet host: TVM's thread pool
    synchronises at every kernel, and with another job on the 2 cores a tiny model's TVM decode
    fell from ~25,000 to 25-300 tok/s (a descheduled pool thread stalls each barrier)."""
    from child_json import run_json

    runs = [[] for _ in rows]
    for k in range(args.decode_runs):
        for i, r in enumerate(rows):
            runs[i].append(run_json(decode_code(r, args)))
        log(f"decode round {k + 1}/{args.decode_runs}")
    for r, v in zip(rows, runs):
        r["decode_runs"], r["decode_tok_s"] = v, statistics.median(v)


def compare(rows: list[dict]) -> None:
    ladder = [(r["decode_tok_s"], r["kl"]) for r in rows if r["who"] == "llama.cpp" and "decode_tok_s" in r]
    for r in rows:
        if r["who"] == "edgeq" and "decode_tok_s" in r:
            k = ladder_kl_at(r["decode_tok_s"], ladder)
            r["ladder_kl_at_speed"] = k
            r["kl_vs_ladder"] = None if k is None or k == 0 else r["kl"] / k


def table(rows: list[dict], ref_ppl: float | None) -> str:
    lines = ["| point | size MB | ppl | ppl / fp32 | KL mean | top-1 | decode tok/s | ladder KL at this speed | "
             "KL / ladder |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r.get("decode_tok_s", 0)):
        lk, kr = r.get("ladder_kl_at_speed"), r.get("kl_vs_ladder")
        lines.append(f"| {r['who']} {r['point']} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.3f} | "
                     + (f"{r['ppl'] / ref_ppl:.3f}" if ref_ppl else "-") + f" | {r['kl']:.4f} | {r['top1']:.3f} | "
                     + (f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-") + " | "
                     + (f"{lk:.4f}" if lk is not None else ("outside" if r["who"] == "edgeq" else "")) + " | "
                     + (f"{kr:.2f}x" if kr is not None else "") + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lad = sorted((r for r in rows if r["who"] == "llama.cpp"), key=lambda r: r["decode_tok_s"])
    ax.plot([r["decode_tok_s"] for r in lad], [r["kl"] for r in lad], "o-", color="gray", label="llama.cpp ladder")
    for r in lad:
        ax.annotate(r["point"], (r["decode_tok_s"], r["kl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for fmt, mark in zip(sorted({r["format"] for r in rows if r["who"] == "edgeq"}), "s^Dv"):
        pts = sorted((r for r in rows if r["who"] == "edgeq" and r["format"] == fmt), key=lambda r: r["rate"])
        ax.plot([r["decode_tok_s"] for r in pts], [r["kl"] for r in pts], mark + "--", label=f"edgeq {fmt}, rates")
        for r in pts:
            ax.annotate(f"{r['rate']:g}", (r["decode_tok_s"], r["kl"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
    ax.set_xlabel("decode tok/s (2 threads, median)")
    ax.set_ylabel("KL(fp32 || point), mean per token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, format="svg", bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cache" / "smollm2-135m-instruct")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--formats", default="gguf,onnx,tvm")
    ap.add_argument("--rates", default="0,0.15,0.25")
    ap.add_argument("--edgeq-args", default="--bits 4 --prune-dims mlp --prune-bias",
                    help="more `edgeq build` options for the pruned artifacts")
    ap.add_argument("--target", default="cpu-avx2")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--decode-runs", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-ladder")
    ap.add_argument("--stage", choices=["all", "decode"], default="all",
                    help="decode: re-measure decode speed only, on a previous run's results.json")
    args = ap.parse_args(argv)
    args.types = [t.strip() for t in args.types.split(",") if t.strip()]
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.stage == "decode":  # a previous run's builds and quality numbers; decode speed again
        prev = json.loads((args.out / "results.json").read_text())
        rows, ref_ppl, t_build = prev["rows"], prev["reference_ppl"], prev["build_s"]
    else:
        rows = build_ladder(args, args.out) + build_rates(args, args.out)
        t_build = time.perf_counter() - t0
        ref_ppl = evaluate(rows, args, args.out)
    if args.decode_runs > 0:
        decode(rows, args)
        compare(rows)
    res = {"rows": rows, "reference_ppl": ref_ppl, "build_s": t_build, "seconds": time.perf_counter() - t0,
           "args": {k: str(v) for k, v in vars(args).items()}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    if args.decode_runs > 0:
        plot(rows, args.out / "ladder.svg")
    print(table(rows, ref_ppl))
    return 0


if __name__ == "__main__":
    sys.exit(main())

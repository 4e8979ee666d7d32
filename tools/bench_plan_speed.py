"""Issue 16 item 4: planned GGUF builds with and without a decode-speed floor vs llama.cpp's own
file of the same size, side by side.

    .venv/bin/python tools/bench_plan_speed.py [--model models/cache/smollm2-135m-instruct]
        [--types Q8_0,Q4_K_M,Q4_0] [--min-speed 0.97] [--calib-samples 64]
        [--sensitivity kl-probe|fisher] [--threads 2] [--tokens 128] [--kl-tokens 2048] [--decode-runs 5]
        [--stage all|build|eval] [--out out/bench-plan-speed]

``build``: an F32 GGUF of the model; ``llama_model_quantize`` makes each llama.cpp type from it;
the planner's option table (the KL probe: the expensive part) is measured once; per size point
two edgeq plans with the llama.cpp file's size as their budget (as tools/bench_quant.py):
``free`` (size only, today's default) and ``floor`` (``--min-speed`` against the uniform plan of
the same size, the cpu-avx2 speed costs of edgeq/quant/speed_costs.json); GPTQ + QERA on the
chosen grids, compensation as a LoRA GGUF. ``eval``: KL(fp32 reference || artifact) and top-1 on
the first ``--kl-tokens`` wikitext-2 tokens (ctx 512, second half of each window scored; the
reference is edgeq's numpy runtime on the fp32 model), then decode tok/s in llama.cpp ("Once upon
a time" + ``--tokens`` greedy tokens, 1 warm-up, ``--decode-runs`` rounds with the three files of a
size point interleaved A B C; medians of llama.cpp's decode wall time and of the process CPU seconds
per generated token -- the one to compare on a shared machine, with ``--threads 1`` -- and the
median over rounds of each file's ratio to llama.cpp's in the same round). Writes
OUT/results-TYPES-klN.json and prints a markdown table (``eval`` takes ``--types`` as a subset of the build's;
``--decode-runs 0`` / ``--kl-tokens 0`` skip that part).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_quant import DECODE_PROMPT, CachedLogits, llamacpp_quantize, log  # noqa: E402


def build(args) -> list[dict]:
    from edgeq.backends.gguf import lower as lg
    from edgeq.backends.gguf.backend import GgufBackend
    from edgeq.backends.reference.ir_files import write_ir
    from edgeq.calibrate import alpaca_token_sequences, calibrate
    from edgeq.frontend import load_model
    from edgeq.plan import Choice, Option, make_plan, measure_options, plan_bytes
    from edgeq.quant.apply import COMP_SOURCE, has_compensation, quantize_ir
    from edgeq.quant.sensitivity import KLProbe
    from edgeq.quant.speed import speed_model
    from edgeq.targets import load_target

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    ir = load_model(args.model)
    f32 = out / "f32.gguf"
    if not f32.exists():
        lg.write_gguf(ir, f32, lg.tensor_types(ir, 32))
    if not (out / "fp32-ir").exists():
        (out / "fp32-ir").mkdir()
        write_ir(ir, out / "fp32-ir")
    target = load_target("cpu-avx2")
    t0 = time.perf_counter()
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=args.calib_samples, seq_len=256)
    stats = calibrate(ir, seqs)
    log(f"calibrated in {time.perf_counter() - t0:.0f}s; measuring the option table")
    t0 = time.perf_counter()
    # (the table's model: v2 = with the runtime's activation rounding, edgeq.quant.act_noise, 2026-12-07)
    cached = out / f"options-{args.sensitivity}-{args.calib_samples}-v2.json"
    if cached.exists():  # the option table of an earlier run (same model, calibration, sensitivity)
        table = {n: [Option(Choice(o["type"], o["rank"]), o["nbytes"], o["kl"]) for o in v]
                 for n, v in json.loads(cached.read_text()).items()}
    else:
        table = measure_options(ir, stats, target.plan_types("gguf"), target.plan_ranks,
                                probe=KLProbe(ir, [s[:128] for s in seqs[-4:]]), sensitivity=args.sensitivity)
        cached.write_text(json.dumps({n: [{"type": o.choice.type, "rank": o.choice.rank, "nbytes": o.nbytes,
                                          "kl": o.kl} for o in v] for n, v in table.items()}))
    t_measure = time.perf_counter() - t0
    log(f"option table in {t_measure:.0f}s")
    speed = speed_model(target.name, "gguf", target.bandwidth_gb_s)  # read now: tools/bench_speed_costs.py --write
    log(f"speed model: {speed.profile}/{speed.backend} ({speed.source})")
    overhead, cache, rows = lg.fixed_overhead_bytes(ir), {}, []
    backend = GgufBackend()
    for ft in args.types:
        dst = out / f"llamacpp-{ft}.gguf"
        llamacpp_quantize(f32, dst, ft, args.threads)
        size = dst.stat().st_size
        rows.append({"who": "llama.cpp", "type": ft, "files": [str(dst)], "bytes": size})
        budget = size - overhead - 16384  # the compensation LoRA GGUF's header + index
        for kind, floor in (("free", None), ("floor", args.min_speed)):
            plan = make_plan(ir, stats, target.name, target.plan_types("gguf"), target.plan_ranks, budget,
                             table=table, model=args.model.name, speed=speed, min_speed=floor,
                             uniform=lambda t: backend.uniform_plan(ir, t))
            qir = quantize_ir(ir, plan, stats, cache=cache)
            d = out / f"edgeq-{kind}-{ft}"
            d.mkdir(exist_ok=True)
            types = lg.tensor_types(ir, "F32")
            types.update({n: lg.as_qtype(c.type) for n, c in plan.tensors.items()})
            lg.write_gguf(qir, d / "model.gguf", types, allow_low_rank=True)
            files = [d / "model.gguf"]
            if has_compensation(qir):
                lg.write_lora_gguf(qir, COMP_SOURCE, d / "compensation.gguf", dtype="F16")
                files.append(d / "compensation.gguf")
            plan.save(d / "plan.toml")
            mix = Counter(c.type + (f"+r{c.rank}" if c.rank else "") for c in plan.tensors.values())
            rows.append({"who": f"edgeq {kind}", "type": ft, "files": [str(f) for f in files],
                         "bytes": sum(f.stat().st_size for f in files),
                         "predicted_bytes": plan_bytes(ir, plan) + overhead, "predicted_kl": plan.summary["predicted_kl"],
                         "predicted_ms": plan.summary["predicted_ms_per_token"],
                         "mix": dict(sorted(mix.items(), key=lambda kv: -kv[1])),
                         "summary": {k: v for k, v in plan.summary.items() if "speed" in k or "reference" in k}})
            log(f"{ft} {kind}: {rows[-1]['bytes'] / 1e6:.2f} MB (llama.cpp {size / 1e6:.2f}), "
                f"predicted {rows[-1]['predicted_ms']:.3f} ms/token, mix {dict(mix)}")
    (out / "build.json").write_text(json.dumps({"rows": rows, "measure_s": t_measure, "speed": speed.to_json()},
                                               indent=1))
    return rows


def evaluate(rows: list[dict], args) -> None:
    from edgeq.backends.reference.ir_files import read_ir
    from edgeq.evaluate import evaluate_wikitext, wikitext2_test_text
    from runtimes.llamacpp import LlamaCppSession
    from runtimes.reference import ReferenceSession

    if args.kl_tokens:
        ref = CachedLogits(ReferenceSession(read_ir(args.out / "fp32-ir"), n_ctx=512), args.out / "ref-logits")
        text, tokens = wikitext2_test_text(), None
        for r in rows:
            with LlamaCppSession(r["files"][0], lora_paths=r["files"][1:], n_ctx=1024, n_threads=args.threads) as s:
                if tokens is None:
                    tokens = list(s.tokenize(text, add_special=False))
                w = evaluate_wikitext(s, ref, tokens=tokens, ctx=512, max_tokens=args.kl_tokens)
                r.update(kl=w.kl.mean_kl, top1=w.kl.top1_agreement, ppl=w.perplexity.ppl)
            log(f"{r['type']} {r['who']}: KL {r['kl']:.4f} top-1 {r['top1']:.3f}")
    for ft in args.types if args.decode_runs > 0 else ():
        group = [r for r in rows if r["type"] == ft]
        sess = [LlamaCppSession(r["files"][0], lora_paths=r["files"][1:], n_ctx=512, n_threads=args.threads)
                for r in group]
        try:
            ids = [s.tokenize(DECODE_PROMPT) for s in sess]
            for s, x in zip(sess, ids):
                list(s.generate_ids(x, args.tokens, stop_at_eos=False))
            runs, cpu = [[] for _ in sess], [[] for _ in sess]
            for _ in range(args.decode_runs):
                for k, (s, x) in enumerate(zip(sess, ids)):
                    c0 = time.process_time()
                    list(s.generate_ids(x, args.tokens, stop_at_eos=False))
                    cpu[k].append((time.process_time() - c0) / args.tokens)
                    runs[k].append(s.last_stats.decode_tok_s)
        finally:
            for s in sess:
                s.close()
        base = next(k for k, r in enumerate(group) if r["who"] == "llama.cpp")
        for r, v, c in zip(group, runs, cpu):
            # the ratio to llama.cpp's file within each round (the files of a round run back to back,
            # so a load change between rounds cancels), then the median over the rounds
            r.update(decode_runs=v, decode_tok_s=statistics.median(v), cpu_s_per_token_runs=c,
                     cpu_tok_s=1 / statistics.median(c),
                     round_ratio=statistics.median(a / b for a, b in zip(v, runs[base])),
                     round_ratio_cpu=statistics.median(b / a for a, b in zip(c, cpu[base])))
        log(f"{ft} decode: " + ", ".join(f"{r['who']} {r['decode_tok_s']:.1f} tok/s wall, {r['cpu_tok_s']:.1f} per CPU s"
                                         for r in group))


def table(rows: list[dict]) -> str:
    lines = ["| size point | build | MB | predicted ms/token | predicted vs uniform | KL | top-1 | decode tok/s (wall) | "
             "tokens per CPU s | decode vs llama.cpp (CPU) | median of per-round ratios (wall / CPU) | "
             "KL vs llama.cpp | mix |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["type"] == r["type"] and x["who"] == "llama.cpp")
        pv = r.get("summary", {}).get("predicted_speed_vs_reference")
        lines.append(f"| {r['type']} | {r['who']} | {r['bytes'] / 1e6:.2f} | {r.get('predicted_ms', float('nan')):.3f} | "
                     f"{'' if pv is None else f'{pv:.3f}'} | {r.get('kl', float('nan')):.4f} | "
                     f"{r.get('top1', float('nan')):.3f} | {r.get('decode_tok_s', float('nan')):.1f} | "
                     f"{r.get('cpu_tok_s', float('nan')):.1f} | "
                     f"{r.get('cpu_tok_s', float('nan')) / base.get('cpu_tok_s', float('nan')):.3f} | "
                     f"{r.get('round_ratio', float('nan')):.3f} / {r.get('round_ratio_cpu', float('nan')):.3f} | "
                     f"{r.get('kl', float('nan')) / base.get('kl', float('nan')):.3f} | "
                     f"{', '.join(f'{k} x{v}' for k, v in r.get('mix', {}).items())} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cache" / "smollm2-135m-instruct")
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q4_0")
    ap.add_argument("--min-speed", type=float, default=0.97)
    ap.add_argument("--calib-samples", type=int, default=64, help="Alpaca calibration sequences of 256 tokens")
    ap.add_argument("--sensitivity", choices=["fisher", "kl-probe"], default="kl-probe",
                    help="the planner's sensitivity (edgeq build --sensitivity); fisher is ~20x faster")
    ap.add_argument("--kl-tokens", type=int, default=2048)
    ap.add_argument("--decode-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads (1 on a shared machine: CPU time)")
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens per decode run")
    ap.add_argument("--stage", choices=["all", "build", "eval"], default="all")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-plan-speed")
    args = ap.parse_args(argv)
    args.types = [t.strip() for t in args.types.split(",") if t.strip()]
    if args.stage in ("all", "build"):
        rows = build(args)
    else:
        rows = [r for r in json.loads((args.out / "build.json").read_text())["rows"] if r["type"] in args.types]
    if args.stage in ("all", "eval"):
        evaluate(rows, args)
        res = args.out / f"results-{'-'.join(args.types)}-kl{args.kl_tokens}.json"
        res.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                   "date": time.strftime("%Y-%m-%d")}, indent=1))
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 4 benchmark: llama.cpp's own quantizer vs edgeq plans at matching sizes, side by side.

    .venv/bin/python tools/bench_quant.py [--model models/cache/smollm2-135m-instruct]
        [--adapter models/cache/smollm2-alpaca-lora | --adapter ""]
        [--variants merged,uniql] [--types Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_1,Q4_0,Q3_K_M]
        [--ppl-tokens 16384] [--lambada 500] [--decode-runs 5] [--out out/bench-quant]

``--model`` another checkpoint (e.g. the materialised Gemma 3 270M, with ``--adapter ""``: no
adapter; the ``merged`` variant is then the model itself). The fp32 reference's logits are
cached per window as .npy files under OUT/VARIANT/ref-logits (memory-mapped: a 262k-token
vocabulary makes each 512-token window 0.5 GB).

For each model variant
  * ``merged``: SmolLM2-135M-Instruct with the LoRA adapter merged (off the source's Q4_1 grid);
  * ``uniql``:  the same after UniQL sorting/SVD at rate 0 (calibrated; Q/K pair order restored
    for GGUF, so only the MLP permutation and the V/O rotation change the weights);
an F32 GGUF is written, ``llama_model_quantize`` makes each llama.cpp type from it (no imatrix),
and edgeq builds a plan for the cpu-avx2 candidates whose total size (model GGUF + compensation
LoRA GGUF) is the llama.cpp file's size (the planner gets that size minus the fixed overhead as
its budget). Every artifact is then measured with the same code (edgeq.evaluate):
wikitext-2 perplexity (ctx 512, second half scored), KL(fp32 reference ‖ artifact) and top-1
agreement on the same positions -- the reference is the variant's fp32 IR in edgeq's numpy
reference runtime, its logits computed once and cached --, LAMBADA (first N items), and decode
tok/s in llama.cpp (128 greedy tokens, 1 warm-up, median of N runs, llama.cpp / edgeq of one
size point interleaved A B A B). Writes OUT/results.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeq.evaluate import evaluate_wikitext, lambada, wikitext2_test_text  # noqa: E402
from edgeq.frontend import load_adapter, load_model, merge_adapters  # noqa: E402
from edgeq.backends.gguf import lower as lower_gguf  # noqa: E402
from runtimes.llamacpp import LlamaCppSession  # noqa: E402

# llama_ftype values (llama.h)
LLAMA_FTYPES = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q4_1": 3, "Q4_0": 2, "Q3_K_M": 12,
                "Q5_0": 8, "Q5_1": 9, "Q4_K_S": 14, "Q5_K_S": 16}
DECODE_PROMPT = "Once upon a time"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def llamacpp_quantize(src: Path, dst: Path, ftype: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.nthread = threads
    t = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed")
    return time.perf_counter() - t


class CachedLogits:
    """A session wrapper that remembers logits per token window (the fp32 reference, once), on
    disk under ``cache_dir`` (memory-mapped when read back)."""

    def __init__(self, session, cache_dir: Path):
        self.s, self.dir = session, Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = getattr(session, "name", "reference")

    def tokenize(self, *a, **k):
        return self.s.tokenize(*a, **k)

    def logits(self, ids):
        import hashlib

        key = np.asarray([int(i) for i in ids], dtype=np.int64)
        path = self.dir / f"{hashlib.sha256(key.tobytes()).hexdigest()[:24]}.npy"
        if not path.exists():
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, np.asarray(self.s.logits(key.tolist()), dtype=np.float32))
            tmp.replace(path)
        return np.load(path, mmap_mode="r")


def variant_ir(name: str, args, log=log):
    """(float ModelIR to quantize, ModelIR for the F32 GGUF / reference) of a variant."""
    ir = load_model(args.model)
    if args.adapter:
        ir = merge_adapters(load_adapter(ir, args.adapter))
    if name == "merged":
        return ir
    if name == "uniql":
        from edgeq.calibrate import alpaca_token_sequences, calibrate
        from edgeq.passes.sort_qk import restore_rope_order
        from edgeq.passes import run_pass
        from edgeq.passes.uniql import UniQLSortConfig

        seqs = alpaca_token_sequences(ir.tokenizer, n_samples=args.calib_samples, seq_len=args.calib_len)
        log("uniql: calibrating and sorting at rate 0")
        return restore_rope_order(run_pass(ir, UniQLSortConfig(), calibrate(ir, seqs)))
    raise SystemExit(f"unknown variant {name!r}")


def build_variant(vname: str, args, out: Path) -> list[dict]:
    from edgeq.calibrate import alpaca_token_sequences, calibrate
    from edgeq.plan import make_plan, measure_options, n_weights, plan_bytes
    from edgeq.quant.apply import COMP_SOURCE, has_compensation, quantize_ir
    from edgeq.quant.sensitivity import KLProbe
    from edgeq.targets import load_target

    out.mkdir(parents=True, exist_ok=True)
    ir = variant_ir(vname, args)
    f32 = out / "f32.gguf"
    log(f"{vname}: writing F32 GGUF")
    lower_gguf.write_gguf(ir, f32, lower_gguf.tensor_types(ir, 32))
    from edgeq.backends.reference.ir_files import write_ir

    (out / "fp32-ir").mkdir(exist_ok=True)
    write_ir(ir, out / "fp32-ir")  # the reference model of this variant
    target = load_target(args.target)
    t0 = time.perf_counter()
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=args.calib_samples, seq_len=args.calib_len)
    stats = calibrate(ir, seqs)
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = KLProbe(ir, [s[:128] for s in seqs[-args.probe_samples:]])
    table = measure_options(ir, stats, target.plan_types("gguf"), target.plan_ranks, probe=probe,
                            activations=args.activations)
    t_measure = time.perf_counter() - t0
    overhead = lower_gguf.fixed_overhead_bytes(ir)
    cache: dict = {}
    rows = []
    for ft in args.types:
        dst = out / f"llamacpp-{ft}.gguf"
        secs = llamacpp_quantize(f32, dst, ft, args.threads)
        size = dst.stat().st_size
        rows.append({"variant": vname, "who": "llama.cpp", "type": ft, "files": [str(dst)], "bytes": size,
                     "build_s": secs})
        lora_overhead = 16384  # header of the compensation LoRA GGUF + its tensor index
        budget = size - overhead - lora_overhead
        t0 = time.perf_counter()
        plan = make_plan(ir, stats, target.name, target.plan_types("gguf"), target.plan_ranks, budget,
                         table=table, model=f"{args.model.name} ({vname})")
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        qir = quantize_ir(ir, plan, stats, cache=cache)
        t_quant = time.perf_counter() - t0
        d = out / f"edgeq-{ft}"
        d.mkdir(exist_ok=True)
        types = lower_gguf.tensor_types(ir, "F32")
        types.update({n: lower_gguf.as_qtype(c.type) for n, c in plan.tensors.items()})
        t0 = time.perf_counter()
        lower_gguf.write_gguf(qir, d / "model.gguf", types, allow_low_rank=True)
        files = [d / "model.gguf"]
        if has_compensation(qir):
            lower_gguf.write_lora_gguf(qir, COMP_SOURCE, d / "compensation.gguf", dtype="F16")
            files.append(d / "compensation.gguf")
        plan.save(d / "plan.toml")
        t_write = time.perf_counter() - t0
        total = sum(f.stat().st_size for f in files)
        from collections import Counter

        mix = Counter(c.type + (f"+r{c.rank}" if c.rank else "") for c in plan.tensors.values())
        rows.append({"variant": vname, "who": "edgeq", "type": f"plan@{ft}", "files": [str(f) for f in files],
                     "bytes": total, "predicted_bytes": plan_bytes(ir, plan) + overhead,
                     "plan_s": t_plan, "quantize_s": t_quant, "write_s": t_write,
                     "mix": dict(sorted(mix.items(), key=lambda kv: -kv[1])),
                     "predicted_kl": plan.summary["predicted_kl"]})
        log(f"{vname} {ft}: llama.cpp {size / 1e6:.2f} MB, edgeq {total / 1e6:.2f} MB "
            f"({total / size:.4f}x), quantize {t_quant:.0f}s; mix {dict(mix)}")
    for r in rows:
        r["bpw"] = r["bytes"] * 8 / n_weights(ir)
    meta = {"calibrate_s": t_cal, "measure_s": t_measure, "overhead_bytes": overhead}
    (out / "build.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    return rows


def eval_variant(vname: str, rows: list[dict], args, out: Path) -> None:
    from edgeq.backends.reference.ir_files import read_ir
    from runtimes.reference import ReferenceSession

    ref = CachedLogits(ReferenceSession(read_ir(out / "fp32-ir"), n_ctx=args.ctx), out / "ref-logits")
    text = wikitext2_test_text()
    tokens = None
    for r in rows:
        model, loras = r["files"][0], r["files"][1:]
        with LlamaCppSession(model, lora_paths=loras, n_ctx=2048, n_threads=args.threads) as s:
            if tokens is None:
                tokens = list(s.tokenize(text, add_special=False))
            t = time.perf_counter()
            w = evaluate_wikitext(s, ref, tokens=tokens, ctx=args.ctx, max_tokens=args.ppl_tokens)
            r.update(ppl=w.perplexity.ppl, scored=w.perplexity.scored_tokens, kl=w.kl.mean_kl, kl_p99=w.kl.p99_kl,
                     top1=w.kl.top1_agreement, ref_ppl=w.reference_perplexity.ppl)
            if args.lambada:
                lam = lambada(s, limit=args.lambada, progress=False)
                r.update(lambada=lam.accuracy, lambada_items=lam.items)
            r["eval_s"] = time.perf_counter() - t
        log(f"{vname} {r['who']} {r['type']}: ppl {r['ppl']:.3f} KL {r['kl']:.4f} top1 {r['top1']:.3f} "
            f"LAMBADA {r.get('lambada')}")
    if args.lambada:  # the unquantized model's LAMBADA, through llama.cpp on the F32 GGUF (fast)
        with LlamaCppSession(out / "f32.gguf", n_ctx=2048, n_threads=args.threads) as s0:
            lam = lambada(s0, limit=args.lambada, progress=False)
        for r in rows:
            r["ref_lambada"] = lam.accuracy
        log(f"{vname} F32 (llama.cpp) LAMBADA {lam.accuracy:.3f}")
    if args.decode_runs > 0:
        decode_variant(vname, rows, args)


def decode_variant(vname: str, rows: list[dict], args) -> None:
    """llama.cpp and edgeq of the same size point interleaved; edgeq also without its
    compensation adapter (what the LoRA path of llama.cpp costs)."""
    for i in range(0, len(rows), 2):
        pair = rows[i:i + 2]
        cfgs = [(r["files"][0], r["files"][1:]) for r in pair]
        if len(pair[1]["files"]) > 1:
            cfgs.append((pair[1]["files"][0], []))
        sess = [LlamaCppSession(m, lora_paths=l, n_ctx=512, n_threads=args.threads) for m, l in cfgs]
        try:
            ids = [s.tokenize(DECODE_PROMPT) for s in sess]
            for s, x in zip(sess, ids):
                list(s.generate_ids(x, 128, stop_at_eos=False))
            runs = [[] for _ in sess]
            for _ in range(args.decode_runs):
                for k, (s, x) in enumerate(zip(sess, ids)):
                    list(s.generate_ids(x, 128, stop_at_eos=False))
                    runs[k].append(s.last_stats.decode_tok_s)
            for r, v in zip(pair, runs):
                r["decode_runs"] = v
                r["decode_tok_s"] = statistics.median(v)
            if len(runs) > 2:
                pair[1]["decode_runs_without_compensation"] = runs[2]
                pair[1]["decode_tok_s_without_compensation"] = statistics.median(runs[2])
        finally:
            for s in sess:
                s.close()
        log(f"{vname} decode {pair[0]['type']}: " + ", ".join(f"{r['who']} {r['decode_tok_s']:.1f}" for r in pair)
            + (f", edgeq w/o compensation {statistics.median(runs[2]):.1f}" if len(runs) > 2 else ""))


def table(rows: list[dict]) -> str:
    lines = ["| model | quantizer | type / plan | size MB | bpw | ppl | KL mean | KL p99 | top-1 | LAMBADA | "
             "decode tok/s | edgeq/llama.cpp size | KL ratio | decode ratio | decode ratio w/o comp. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        for r in (a, b):
            lam = f"{r['lambada']:.3f}" if r.get("lambada") is not None else "-"
            nc = b.get("decode_tok_s_without_compensation")
            da, db = a.get("decode_tok_s"), b.get("decode_tok_s")
            ratio = (f"{b['bytes'] / a['bytes']:.4f} | {b['kl'] / a['kl']:.3f} | "
                     + (f"{db / da:.3f}" if da and db else "-") + " | "
                     + (f"{nc / da:.3f}" if nc and da else "-")) if r is b else " | | | "
            lines.append(f"| {r['variant']} | {r['who']} | {r['type']} | {r['bytes'] / 1e6:.2f} | {r['bpw']:.3f} | "
                         f"{r['ppl']:.3f} | {r['kl']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.3f} | {lam} | "
                         + (f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "-") + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cache" / "smollm2-135m-instruct")
    ap.add_argument("--adapter", type=lambda s: Path(s) if s else None,
                    default=REPO / "models" / "cache" / "smollm2-alpaca-lora", help='"" for none')
    ap.add_argument("--variants", default="merged,uniql")
    ap.add_argument("--types", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_1,Q4_0,Q3_K_M")
    ap.add_argument("--target", default="cpu-avx2")
    ap.add_argument("--activations", default="llama-cpu", choices=["llama-cpu", "llama-cuda", "none"],
                    help="the planner's model of the runtime's activation rounding (none: weight error only, "
                         "the planner before 2026-12-07)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--probe-samples", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--lambada", type=int, default=500, help="first N LAMBADA items (0: skip)")
    ap.add_argument("--decode-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=["all", "build", "eval", "decode"], default="all",
                    help="decode: re-measure decode speed only, on a previous eval's results")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-quant")
    args = ap.parse_args(argv)
    args.types = [t.strip() for t in args.types.split(",") if t.strip()]
    if args.adapter and not (args.adapter / "adapter_config.json").exists():
        raise SystemExit(f"{args.adapter}: no adapter (train it: python -m models.train_lora --out {args.adapter})")
    t_start = time.perf_counter()
    all_rows = []
    for v in [x.strip() for x in args.variants.split(",") if x.strip()]:
        out = args.out / v
        if args.stage in ("all", "build"):
            rows = build_variant(v, args, out)
        elif args.stage == "decode":
            rows = json.loads((out / "results.json").read_text())
            decode_variant(v, rows, args)
            (out / "results.json").write_text(json.dumps(rows, indent=1))
        else:
            rows = json.loads((out / "build.json").read_text())["rows"]
        if args.stage in ("all", "eval"):
            eval_variant(v, rows, args, out)
            (out / "results.json").write_text(json.dumps(rows, indent=1))
        all_rows += rows
    if args.stage == "build":
        return 0
    res = {"rows": all_rows, "args": {k: str(v) for k, v in vars(args).items()}, "seconds": time.perf_counter() - t_start,
           "date": time.strftime("%Y-%m-%d")}
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    print(table(all_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 5 part 4 benchmark: one ONNX artifact carrying four pruning rates on onnxruntime.

    .venv/bin/python tools/bench_onnx_rates.py [--stage build|lower|quality|speed|interleave|all] [--rates 0,0.15,0.25,0.35]
        [--bits 4] [--ppl-tokens 8192] [--kl-tokens 2048] [--runs 5] [--rounds 2] [--threads 2]
        [--out out/bench-onnx-rates]

SmolLM2-135M-Instruct, target cpu-avx2. ``build``: the compress step of ``edgeq build
--prune-rates`` (Alpaca calibration, UniQL sort, per-layer rate plan at the profile's granularity)
once, then the *same* sorted model lowered three times with the same int-group weights:
``rates4`` carrying every rate (one graph, a rate input; the default MLP form: full-width matmuls,
the pruned channels masked, attention masks), ``rates4seg`` the same with the MLP split into
segments behind If nodes (``ffn_rates="segments"``, the form before issue 16) and ``rate1``
carrying rate 0 only (no rate input, no segments, no masks) — the "1 rate loaded" baseline. The
float model is kept as a reference artifact (``ir/``) for the quality stage (``lower`` re-lowers it).

``speed``: one fresh process per artifact (A B A B over ``--rounds``): RSS after loading, decode
tok/s (128 greedy tokens) and prefill tok/s (128-token prompt) at every rate, the median time of
``set_prune_rate`` (1000 calls) and of the first decode step after a switch, peak RSS of the
process after running every rate. ``interleave``: the decode speed comparison in one process, every
artifact's session open, A B C rounds (``--rounds``; each: 64 greedy tokens per artifact and rate),
medians and ratios to ``rate1`` at rate 0 — less exposed to a shared machine's load drifting between
processes than ``speed``. ``quality``: per rate, wikitext-2 perplexity (ctx 512, second
half of each window scored) and KL(reference ‖ onnx) vs edgeq's numpy runtime (float64) on the
artifact's own dequantized weights at that rate. Writes OUT/results.json and prints tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from child_json import run_json, speed_rounds  # noqa: E402

MODEL = REPO / "models" / "cache" / "smollm2-135m-instruct"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _write_onnx_artifact(ir, out: Path, weights) -> None:
    from edgeq.artifact import write_manifest
    from edgeq.backends.onnx.lower import write_onnx

    out.mkdir(parents=True, exist_ok=True)
    info = write_onnx(ir, out, weights, progress=True)
    m = {"format": "onnx", "runtime": "onnxruntime", "target": "cpu-avx2", "onnx": info,
         "hparams": ir.hparams.to_json()}
    if ir.prune is not None:
        m["prune"] = {"rates": list(ir.prune.rates), "widths": ir.prune.to_json()["widths"]}
    write_manifest(out, m)


def build(out: Path, rates: tuple[float, ...], bits: int) -> dict:
    from edgeq import pipeline
    from edgeq.backends.reference.ir_files import write_ir
    from edgeq.build import BuildOptions, compress_steps, front_steps
    from edgeq.targets import load_target

    target = load_target("cpu-avx2")
    opts = BuildOptions(model=MODEL, out=out, format="onnx", bits=bits, prune_rates=rates)
    compress = compress_steps(opts, target)
    ctx = pipeline.run([*front_steps(opts), *compress], pipeline.BuildContext(opts=opts, target=target, log=log))
    ir, compress_s = ctx.ir, sum(ctx.timings[s.name] for s in compress)
    (out / "ir").mkdir(parents=True, exist_ok=True)
    write_ir(ir, out / "ir")
    return dict(lower(out, bits), compress_s=compress_s)


def lower(out: Path, bits: int) -> dict:
    """Lower the compressed model saved in ``out/ir`` twice (every rate / rate 0 only)."""
    import shutil

    from edgeq.backends.onnx.backend import onnx_weights
    from edgeq.backends.reference.ir_files import read_ir
    from edgeq.targets import load_target

    ir = read_ir(out / "ir")
    weights = onnx_weights(bits, load_target("cpu-avx2"))
    seg = dataclasses.replace(weights, ffn_rates="segments")
    for name, model, w in (("rates4", ir, weights), ("rates4seg", ir, seg), ("rate1", ir.replace(prune=None), weights)):
        log(f"lowering {name}")
        shutil.rmtree(out / name, ignore_errors=True)
        _write_onnx_artifact(model, out / name, w)
    return {"weights": weights.to_json(),
            "ffn_widths": {f"{r:g}": [w.ffn for w in ir.prune.widths[r]] for r in ir.prune.rates}}


def quality(out: Path, rates, ppl_tokens: int, kl_tokens: int, threads: int) -> dict:
    from edgeq.artifact import read_manifest
    from edgeq.evaluate import evaluate_wikitext, wikitext2_test_text
    from edgeq.backends.reference.ir_files import read_ir
    from edgeq.backends.onnx.lower import OnnxOptions, lowered_ir
    from edgeq.session import open_session
    from runtimes.reference import ReferenceSession

    m = read_manifest(out / "rates4")
    own = ReferenceSession(lowered_ir(read_ir(out / "ir"), OnnxOptions(**m["onnx"]["weights"])), n_ctx=600,
                           dtype=np.float64)
    s = open_session(out / "rates4", n_ctx=600, threads=threads)
    tokens = list(s.tokenize(wikitext2_test_text(), add_special=False))
    res = {}
    for r in rates:
        log(f"quality at rate {r:g}")
        s.set_prune_rate(r)
        own.set_prune_rate(r)
        ppl = evaluate_wikitext(s, None, tokens=tokens, max_tokens=ppl_tokens).perplexity
        kl = evaluate_wikitext(s, own, tokens=tokens, max_tokens=kl_tokens).kl
        res[f"{r:g}"] = {"ppl": ppl.ppl, "ppl_scored": ppl.scored_tokens, "kl_vs_own_weights": kl.mean_kl,
                         "top1_vs_own_weights": kl.top1_agreement, "kl_scored": kl.count}
    return res


SPEED_CODE = """
import json, statistics, sys, time
sys.path.insert(0, {repo!r})
from edgeq.profile import measure, peak_rss_bytes
from edgeq.session import open_session

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

import onnxruntime, numpy  # the baseline process, before the session
before = rss()
t = time.perf_counter()
s = open_session({path!r}, n_ctx=512, threads={threads})
load_s = time.perf_counter() - t
after_load = rss()
rows = {{}}
for rate in s.prune_rates:
    sw = []
    for _ in range(1000):
        t = time.perf_counter(); s.set_prune_rate(rate); sw.append(time.perf_counter() - t)
    r = measure(s, runs={runs}, max_tokens=128, prefill_lengths=(128,))
    # first decode step after a switch, mid-context (cache kept)
    s._start(s.tokenize("Once upon a time"))
    first = []
    for k in range(20):
        s.set_prune_rate(s.prune_rates[k % len(s.prune_rates)])
        s.set_prune_rate(rate)
        t = time.perf_counter(); s._step(42); first.append(time.perf_counter() - t)
    r.update(switch_s=statistics.median(sw), first_step_after_switch_s=statistics.median(first))
    rows["{{:g}}".format(rate)] = r
print(json.dumps({{"rss_before": before, "rss_after_load": after_load, "load_s": load_s,
                  "peak_rss": peak_rss_bytes(), "rss_end": rss(), "rates": rows}}))
"""


INTERLEAVE_CODE = """
import json, statistics, sys, time
sys.path.insert(0, {repo!r})
from edgeq.session import open_session
arts = {arts!r}
ss = {{n: open_session(p, n_ctx=256, threads={threads}) for n, p in arts.items()}}
ids = ss["rate1"].tokenize("Once upon a time")
got = {{n: {{"{{:g}}".format(r): [] for r in s.prune_rates}} for n, s in ss.items()}}
for k in range({rounds}):
    for n, s in ss.items():
        for r in s.prune_rates:
            s.set_prune_rate(r)
            list(s.generate_ids(ids, 8, stop_at_eos=False))  # warm
            list(s.generate_ids(ids, 64, stop_at_eos=False))
            got[n]["{{:g}}".format(r)].append(s.last_stats.decode_tok_s)
print(json.dumps(got))
"""


def interleave(out: Path, rounds: int, threads: int) -> dict:
    arts = {n: str(out / n) for n in ("rate1", "rates4", "rates4seg") if (out / n / "manifest.json").exists()}
    log(f"interleaved decode, {rounds} rounds: {', '.join(arts)}")
    got = run_json(INTERLEAVE_CODE.format(repo=str(REPO), arts=arts, threads=threads, rounds=rounds))
    base = statistics.median(got["rate1"]["0"])
    return {n: {r: {"decode_tok_s": statistics.median(v), "vs_rate1_at_0": statistics.median(v) / base,
                    "runs": v} for r, v in rates.items()} for n, rates in got.items()}


def speed(out: Path, runs: int, rounds: int, threads: int) -> dict:
    arts = {n: out / n for n in ("rate1", "rates4", "rates4seg") if (out / n / "manifest.json").exists()}
    got = speed_rounds(arts, rounds, lambda path: SPEED_CODE.format(repo=str(REPO), path=str(path), threads=threads,
                                                                    runs=runs), log)
    res = {}
    for name, rs in got.items():
        med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        res[name] = {
            "load_s": med(lambda r: r["load_s"]),
            "rss_after_load_mb": med(lambda r: r["rss_after_load"]) / 1e6,
            "session_rss_mb": med(lambda r: r["rss_after_load"] - r["rss_before"]) / 1e6,
            "peak_rss_mb": med(lambda r: r["peak_rss"]) / 1e6,
            "rates": {rate: {
                "decode_tok_s": statistics.median(x for r in rs for x in r["rates"][rate]["decode_tok_s_runs"]),
                "prefill_128_tok_s": statistics.median(r["rates"][rate]["prefill"]["128"]["tok_s"] for r in rs),
                "switch_us": statistics.median(r["rates"][rate]["switch_s"] for r in rs) * 1e6,
                "first_step_after_switch_ms": statistics.median(r["rates"][rate]["first_step_after_switch_s"]
                                                                for r in rs) * 1e3,
            } for rate in rs[0]["rates"]},
            "rounds": len(rs), "runs_per_round": runs}
    return res


def tables(res: dict) -> str:
    lines = []
    sp = res.get("speed")
    if sp:
        lines += ["| artifact | files MB | load s | RSS after load MB | session RSS MB | peak RSS MB |",
                  "|---|---|---|---|---|---|"]
        for n, v in sp.items():
            lines.append(f"| {n} | {res['sizes_mb'][n]:.1f} | {v['load_s']:.2f} | {v['rss_after_load_mb']:.0f} | "
                         f"{v['session_rss_mb']:.0f} | {v['peak_rss_mb']:.0f} |")
        b = sp["rate1"]
        lines.append("")
        for n in (n for n in ("rates4", "rates4seg") if n in sp):
            a = sp[n]
            lines.append(f"{n} / rate1: RSS after load {a['rss_after_load_mb'] / b['rss_after_load_mb']:.3f}x, "
                         f"session RSS {a['session_rss_mb'] / b['session_rss_mb']:.3f}x, "
                         f"peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.3f}x, decode at rate 0 "
                         f"{a['rates']['0']['decode_tok_s'] / b['rates']['0']['decode_tok_s']:.3f}x")
        lines.append("")
    il = res.get("interleave")
    if il:
        lines += ["| artifact | rate | decode tok/s (interleaved, median) | vs rate1 at rate 0 |", "|---|---|---|---|"]
        for n, rates in il.items():
            for rate, v in rates.items():
                lines.append(f"| {n} | {rate} | {v['decode_tok_s']:.1f} | {v['vs_rate1_at_0']:.3f}x |")
        lines.append("")
    q = res.get("quality", {})
    lines += ["| artifact | rate | weights read MB | ppl | KL vs own weights | top-1 | decode tok/s | prefill tok/s "
              "| set_prune_rate µs | first step after switch ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in ("rate1", "rates4", "rates4seg"):
        for rate, v in (sp or {}).get(n, {}).get("rates", {}).items():
            qq = q.get(rate, {}) if n == "rates4" else {}
            f = lambda d, k, fmt: format(d[k], fmt) if k in d else "-"  # noqa: E731
            wb = res.get("weight_bytes_per_rate", {}).get(n, {}).get(rate)
            lines.append(f"| {n} | {rate} | {'-' if wb is None else format(wb / 1e6, '.1f')} | {f(qq, 'ppl', '.2f')} | "
                         f"{f(qq, 'kl_vs_own_weights', '.2e')} | {f(qq, 'top1_vs_own_weights', '.3f')} | "
                         f"{v['decode_tok_s']:.1f} | {v['prefill_128_tok_s']:.0f} | {v['switch_us']:.2f} | "
                         f"{v['first_step_after_switch_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0,0.15,0.25,0.35")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--kl-tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=["all", "build", "lower", "quality", "speed", "interleave"], default="all",
                    help="build = compress + lower; lower = re-lower the saved compressed model")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-onnx-rates")
    a = ap.parse_args()
    rates = tuple(float(r) for r in a.rates.split(","))
    a.out.mkdir(parents=True, exist_ok=True)
    res_path = a.out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    if a.stage in ("all", "build") or not (a.out / "rates4" / "manifest.json").exists():
        res["build"] = build(a.out, rates, a.bits)
    elif a.stage == "lower":
        res["build"] = dict(res.get("build", {}), **lower(a.out, a.bits))
    from edgeq.artifact import read_manifest

    arts = [n for n in ("rate1", "rates4", "rates4seg") if (a.out / n / "manifest.json").exists()]
    res["sizes_mb"] = {n: sum(f.stat().st_size for f in (a.out / n).iterdir() if f.suffix in (".onnx", ".data"))
                       / 1e6 for n in arts}
    res["weight_bytes_per_rate"] = {n: read_manifest(a.out / n)["onnx"]["weight_bytes_per_rate"]
                                    for n in arts if n != "rate1"}
    if a.stage in ("all", "quality"):
        res["quality"] = quality(a.out, rates, a.ppl_tokens, a.kl_tokens, a.threads)
    if a.stage in ("all", "speed"):
        res["speed"] = speed(a.out, a.runs, a.rounds, a.threads)
    if a.stage in ("all", "interleave"):
        res["interleave"] = interleave(a.out, a.rounds, a.threads)
    res["command"] = " ".join(sys.argv)
    res_path.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(tables(res))


if __name__ == "__main__":
    main()

"""Issue 3 benchmark: UniQL-style sorted pruning vs the naive weight-norm baseline, by rate.

    .venv/bin/python tools/bench_prune.py [--rates 0,0.15,0.25,0.35] [--calib-samples 64]
        [--ppl-tokens 16384] [--lambada 500] [--recover] [--out out/bench-prune]
        [--methods uniql,uniql+bias,uniql+mlp+bias,naive]

SmolLM2-135M-Instruct in float32 (no quantization, so the pruning effect is isolated), run by
the numpy reference runtime, which switches rates in place. Both methods use the same
calibration data (Alpaca), the same per-layer allocation (angular importance) and the same
rounding; they differ only in how each dimension is ranked (UniQL: ridge leverage / RoPE-pair
Q·K energy / whitened SVD; naive: weight L2 norms, no SVD).

Per method and rate: wikitext-2 perplexity (BENCHMARK_PROTOCOL: ctx 512, second half scored),
KL(unpruned ‖ pruned) and top-1 agreement on the same positions, LAMBADA accuracy on the first
N items, decode tok/s (reference runtime, 2 threads, 128 tokens, median of 3 after a warm-up),
resident weight bytes, and the switch time.

``--methods``: comma-separated configurations, each a sort (``uniql`` / ``naive`` / ``flap``) with optional
``+bias`` (``--prune-bias``: per-rate bias compensation) and ``+mlp`` (``--prune-dims mlp``: the
whole rate from the MLP channels) suffixes (issue 15), ``+meas`` (``--importance measured``: the
per-layer MLP widths from measured loss-vs-width curves; with ``+mlp``), ``+fluct`` (``--importance
fluctuation``: FLAP's allocation across layers; with ``flap`` and ``+mlp``), and an optional recovery fine-tune suffix
``+ce`` / ``+kl`` (``--recover --recover-loss ce|kl`` with ``--recover-steps``; e.g.
``uniql+mlp+bias+kl``). Configurations share the calibration and the sort.
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

from edgeq import pipeline  # noqa: E402
from edgeq.build import BuildOptions, compress_steps  # noqa: E402
from edgeq.evaluate import (_window_logits, lambada_item_correct, lambada_item_ids, load_lambada,  # noqa: E402
                            wikitext2_test_text)
from edgeq.frontend import load_model  # noqa: E402
from edgeq.goldens import log_softmax  # noqa: E402
from edgeq.targets import load_target  # noqa: E402
from runtimes.reference import ReferenceSession  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cache" / "smollm2-135m-instruct")
    ap.add_argument("--rates", default="0,0.15,0.25,0.35")
    ap.add_argument("--target", default="cpu-avx2")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--lambada", type=int, default=500, help="first N LAMBADA items (0: skip)")
    ap.add_argument("--decode-runs", type=int, default=3, help="0: no decode speed (a loaded machine)")
    ap.add_argument("--recover", action="store_true", help="also the UniQL model with --recover")
    ap.add_argument("--recover-steps", type=int, default=None)
    ap.add_argument("--methods", default="uniql,naive")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-prune")
    args = ap.parse_args(argv)
    from edgeq.passes.rate_plan import parse_rates

    rates = parse_rates(args.rates)
    target = load_target(args.target)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = load_model(args.model)
    models: dict[str, object] = {}
    build_s: dict[str, float] = {}
    build_cpu_s: dict[str, float] = {}  # this process's CPU seconds (the steps the configuration did not share)
    for method in [m for m in args.methods.split(",") if m]:
        sort, *flags = method.split("+")
        if (sort not in ("uniql", "naive", "flap") or set(flags) - {"bias", "mlp", "meas", "fluct", "ce", "kl"}
                or {"ce", "kl"} <= set(flags) or {"meas", "fluct"} <= set(flags)):
            ap.error(f"--methods: unknown configuration {method!r} (uniql|naive|flap, then +bias / +mlp / "
                     "+meas|+fluct / +ce|+kl)")
        loss = next((f for f in flags if f in ("ce", "kl")), None)
        opts = BuildOptions(model=args.model, out=args.out, prune_rates=rates, sort=sort,
                            calib_samples=args.calib_samples, calib_len=args.calib_len, prune_bias="bias" in flags,
                            prune_dims="mlp" if "mlp" in flags else "all", recover=loss is not None,
                            importance="measured" if "meas" in flags else "fluctuation" if "fluct" in flags
                            else "angular",
                            recover_loss=loss or "ce", recover_steps=args.recover_steps)
        t, c = time.perf_counter(), time.process_time()
        models[method], timings = _compress(base, opts, target)
        build_s[method], build_cpu_s[method] = time.perf_counter() - t, time.process_time() - c
        log(f"{method}: {timings}; {build_cpu_s[method]:.0f} CPU s")
    if args.recover:
        opts = BuildOptions(model=args.model, out=args.out, prune_rates=rates, sort="uniql",
                            calib_samples=args.calib_samples, calib_len=args.calib_len, recover=True,
                            recover_steps=args.recover_steps)
        t = time.perf_counter()
        models["uniql+recover"], _ = _compress(base, opts, target)
        build_s["uniql+recover"] = time.perf_counter() - t
    sessions = {k: ReferenceSession(ir, n_ctx=640) for k, ir in models.items()}
    ref = ReferenceSession(base, n_ctx=640)

    # ---- wikitext-2: ppl + KL vs the unpruned model, all configs per window -----------------
    text = wikitext2_test_text()
    tokens = ref.tokenize(text, add_special=False)[: args.ppl_tokens]
    ctx, first = 512, 256
    n_windows = len(tokens) // ctx
    configs = [(m, r) for m in sessions for r in rates]
    acc = {c: {"nll": 0.0, "kl": [], "agree": 0, "n": 0} for c in configs}
    ref_nll, n_ref = 0.0, 0
    from tqdm import tqdm

    for w in tqdm(range(n_windows), desc="wikitext windows"):
        win = tokens[w * ctx:(w + 1) * ctx]
        tgt = np.asarray(win[first:])
        rows = np.arange(ctx - first)
        rlp = log_softmax(_window_logits(ref, win, first, ctx))
        ref_nll -= float(rlp[rows, tgt].sum())
        n_ref += tgt.size
        for m, r in configs:
            s = sessions[m]
            s.set_prune_rate(r)
            lp = log_softmax(_window_logits(s, win, first, ctx))
            a = acc[(m, r)]
            a["nll"] -= float(lp[rows, tgt].sum())
            a["kl"].append((np.exp(rlp) * (rlp - lp)).sum(-1))
            a["agree"] += int((lp.argmax(-1) == rlp.argmax(-1)).sum())
            a["n"] += tgt.size

    # ---- LAMBADA (first N items) ------------------------------------------------------------
    lam = {c: 0 for c in configs}
    lam_ref = 0
    items = load_lambada(limit=args.lambada) if args.lambada else []
    for context, target_word in tqdm(items, desc="lambada"):
        ids, n_t, _ = lambada_item_ids(ref, context, target_word)
        lam_ref += lambada_item_correct(ref, ids, n_t)
        for m, r in configs:
            sessions[m].set_prune_rate(r)
            lam[(m, r)] += lambada_item_correct(sessions[m], ids, n_t)

    # ---- speed, memory, switch ---------------------------------------------------------------
    s = sessions[next(iter(sessions))]
    prompt = s.tokenize("Once upon a time")
    speed, switch = {}, {}
    for r in rates if args.decode_runs else ():
        s.set_prune_rate(r)
        list(s.generate_ids(prompt, 128, stop_at_eos=False))
    runs: dict[float, list[float]] = {r: [] for r in rates}
    for _ in range(args.decode_runs):
        for r in rates:  # A B A B ...
            s.set_prune_rate(r)
            list(s.generate_ids(prompt, 128, stop_at_eos=False))
            runs[r].append(s.last_stats.decode_tok_s)
    for r in rates:
        speed[r] = statistics.median(runs[r]) if runs[r] else None
        ts = []
        for _ in range(1000):
            t = time.perf_counter()
            s.set_prune_rate(r)
            ts.append(time.perf_counter() - t)
        switch[r] = statistics.median(ts)

    rows_out = []
    recovery = {m: dict(next(h for h in reversed(ir.history) if h.name == "recover").options)
                for m, ir in models.items() if any(h.name == "recover" for h in ir.history)}
    for m, rec in recovery.items():
        log(f"{m}: recovery {rec['steps_done']} steps ({build_cpu_s.get(m, 0):.0f} CPU s with its rate plan and means), "
            f"loss {rec['initial_loss']:.4f} -> {rec['final_loss']:.4f}, by rate {rec['final_loss_by_rate']}")
    for m, r in configs:
        a = acc[(m, r)]
        k = np.concatenate(a["kl"])
        rows_out.append({
            "method": m, "rate": r, "ppl": float(np.exp(a["nll"] / a["n"])), "scored_tokens": a["n"],
            "kl_mean": float(k.mean()), "kl_p99": float(np.percentile(k, 99)), "top1": a["agree"] / a["n"],
            "lambada": lam[(m, r)] / len(items) if items else None, "lambada_items": len(items),
            "decode_tok_s": speed[r], "decode_tok_s_runs": runs[r],
            "resident_weight_bytes": sessions[m].resident_weight_bytes(r), "switch_s": switch[r],
            "realised_rate": _realised(models[m], r)})
    result = {"model": str(args.model), "rates": list(rates), "calib": [args.calib_samples, args.calib_len],
              "unpruned": {"ppl": float(np.exp(ref_nll / n_ref)), "lambada": lam_ref / len(items) if items else None},
              "build_s": build_s, "build_cpu_s": build_cpu_s, "recovery": recovery, "rows": rows_out, "seconds": time.perf_counter() - t0,
              "ffn_widths": {m: {f"{r:g}": [w.ffn for w in ir.prune.at(r)] for r in rates} for m, ir in models.items()},
              "measured": {m: next(h.options["measured"] for h in ir.history if h.name == "rate_plan")
                           for m, ir in models.items()
                           if any(h.name == "rate_plan" and "measured" in h.options for h in ir.history)},
              "date": time.strftime("%Y-%m-%d")}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    u = result["unpruned"]

    def tok_s(row):
        if row["decode_tok_s"] is None:
            return "– | –"
        return f"{row['decode_tok_s']:.1f} | {row['decode_tok_s'] / speed[rates[0]]:.3f}"

    print(f"\nunpruned: ppl {u['ppl']:.3f}, LAMBADA {u['lambada']}; scored tokens {n_ref}; "
          f"LAMBADA items {len(items)}\n")
    print("| method | rate | realised | wikitext-2 ppl | ppl / unpruned | KL mean | top-1 | LAMBADA | "
          "LAMBADA / unpruned | decode tok/s | x rate 0 | weights MB | switch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows_out:
        lam_s = f"{row['lambada']:.3f}" if row["lambada"] is not None else "–"
        lam_r = f"{row['lambada'] / u['lambada']:.3f}" if row["lambada"] is not None and u["lambada"] else "–"
        print(f"| {row['method']} | {row['rate']:g} | {row['realised_rate']:.4f} | {row['ppl']:.3f} | "
              f"{row['ppl'] / u['ppl']:.3f} | {row['kl_mean']:.4f} | {row['top1']:.3f} | {lam_s} | {lam_r} | "
              f"{tok_s(row)} | "
              f"{row['resident_weight_bytes'] / 1e6:.1f} | {row['switch_s'] * 1e6:.1f} us |")
    return 0


_DONE: dict = {}  # a prefix of the steps (repr) -> (ir, statistics, sequences, sort scores) after it: shared


def _compress(base, opts: BuildOptions, target):
    """``base`` through the build's pruning steps (``compress_steps``, run by the build's runner):
    the pruned model and each step's seconds. The longest prefix of the steps that an earlier
    configuration already ran up to its sort (calibration, bias means, sort: the same for every
    configuration with the same options there) is reused, not run again."""
    steps = compress_steps(opts, target)
    ctx = pipeline.BuildContext(opts=opts, target=target, log=log, ir=base)
    k = max((n for n in range(1, len(steps) + 1) if repr(steps[:n]) in _DONE), default=0)
    if k:
        ctx.ir, ctx.stats, ctx.calib_seqs, ctx.sort_scores = _DONE[repr(steps[:k])]
    if not opts.prune_bias:  # the sorted model of a +bias configuration, without its means
        with_bias = compress_steps(dataclasses.replace(opts, prune_bias=True), target)
        j = next((n for n, s in enumerate(with_bias) if s.name == "sort"), None)
        s = next((n for n, s in enumerate(steps) if s.name == "sort"), None)
        if k <= s and j is not None and repr(with_bias[:j + 1]) in _DONE:
            ir, ctx.stats, ctx.calib_seqs, ctx.sort_scores = _DONE[repr(with_bias[:j + 1])]
            ctx.ir, k = ir.replace(prune_means={}), s + 1
    for n in range(k, len(steps)):
        ctx = pipeline.run(steps[n:n + 1], ctx)
        if steps[n].name in ("calibrate", "prune_bias", "sort") and all(
                s.name in ("calibrate", "prune_bias", "sort") for s in steps[:n + 1]):
            _DONE[repr(steps[:n + 1])] = (ctx.ir, ctx.stats, ctx.calib_seqs, ctx.sort_scores)
    return ctx.ir, ctx.timings


def _realised(ir, rate: float) -> float:
    from edgeq.passes.rate_plan import realised_rate

    return realised_rate(ir, ir.prune.at(rate))


if __name__ == "__main__":
    sys.exit(main())

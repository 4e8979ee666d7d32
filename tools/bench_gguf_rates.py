"""Issue 3 (part 6) benchmark: GGUF at a rate — one llama.cpp file per pruning rate.

    .venv/bin/python tools/bench_gguf_rates.py [--model DIR] [--out DIR] [--type Q8_0]
        [--rates 0,0.15,0.25,0.35] [--plan hand|uniform] [--sort naive|none] [--runs 5] [--threads 2]
        [--f32-check]

Writes ``model-r{rate}.gguf`` for every rate (edgeq.backends.gguf.rates.write_gguf_rates) and
reports per rate: file size, architecture (llama / deci), per-layer MLP width range, realised
rate (prunable parameters removed / total), write time, the switch time = LlamaCppSession load
time (constructor, n_ctx 512, warm page cache; median and min of ``--runs``), and checks
against the numpy reference on the same plan: the file's top-1 agreement and max |diff| / max
|ref|, the reference's own top-1 agreement with the unpruned model (how much the plan costs),
and with ``--f32-check`` the max |diff| of an F32 file of the same rate (exactness).
Totals: sum of all per-rate files and the storage overhead vs a single rate-0 file.

Plans (``--plan``):

* ``hand`` (default): MLP-only per-layer widths, no calibration needed. Layer ``l`` loses
  ``phi_l = rate * p_l`` of its prunable parameters (all taken from the MLP), with the profile
  ``p_l ∝ 0.6 + 0.8 sin²(π (l + ½) / L)`` normalised to mean 1 (first/last layers pruned
  least), widths rounded to the granularity (32).
* ``uniform``: ``edgeq.passes.rate_plan.plan_rates(mode="uniform")`` — a full plan (MLP + Q/K
  pairs + V/O), turned into the GGUF-expressible MLP-only plan by ``gguf_prune_spec`` (every
  layer the same width, so the files are plain ``llama``).

``--sort naive`` (default) first applies ``edgeq.passes.naive_sort`` (weight-norm order of MLP
channels, Q/K RoPE pairs -> a non-identity ``rope_index`` that the writer must undo, V/O
components): an exact reparametrisation, so a rate drops low-magnitude channels instead of
arbitrary ones (no calibration needed). ``--sort none`` prunes the checkpoint's own order.

Writes ``bench.json`` next to the files and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeq.frontend import load_model  # noqa: E402
from edgeq.ir import LayerWidths, ModelIR, PruneSpec  # noqa: E402
from edgeq.backends.gguf.lower import tensor_types  # noqa: E402
from edgeq.backends.gguf.rates import (  # noqa: E402
    gguf_prune_spec,
    prunable_params_removed,
    reference_ir_for_gguf,
    write_gguf_at_rate,
    write_gguf_rates,
)
from runtimes.llamacpp import LlamaCppSession  # noqa: E402

GRANULARITY = 32
SANITY_TEXT = "The capital of France is Paris. Once upon a time, a little robot counted the boats."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hand_spec(ir: ModelIR, rates: list[float], g: int = GRANULARITY) -> PruneSpec:
    hp = ir.hparams
    L, F, h = hp.num_layers, hp.intermediate_size, hp.hidden_size
    full = LayerWidths(ffn=F, qk_pairs=hp.head_dim // 2, v_dims=hp.head_dim)
    per_layer = prunable_params_removed(hp, [LayerWidths(0, 0, 0)])  # all prunable params of a layer
    prof = 0.6 + 0.8 * np.sin(np.pi * (np.arange(L) + 0.5) / L) ** 2
    prof = prof / prof.mean()
    widths, prev = {}, np.full(L, F)
    for r in rates:
        if r == 0:
            widths[0.0] = (full,) * L
            continue
        drop = r * prof * per_layer / (3 * h)  # MLP channels each layer gives up
        ffn = np.clip(np.rint((F - drop) / g) * g, g, F).astype(int)
        ffn = np.minimum(ffn, prev)
        prev = ffn
        widths[float(r)] = tuple(LayerWidths(ffn=int(f), qk_pairs=full.qk_pairs, v_dims=full.v_dims) for f in ffn)
    return PruneSpec(rates=tuple(float(r) for r in rates), widths=widths, granularity=g, importance="uniform")


def load_times(path: Path, runs: int, threads: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        s = LlamaCppSession(path, n_ctx=512, n_threads=threads)
        out.append(time.perf_counter() - t)
        s.close()
    return out


def llama_logits(path: Path, ids: list[int], threads: int, kv: str = "f16") -> np.ndarray:
    with LlamaCppSession(path, n_ctx=512, n_threads=threads, kv_cache_type=kv) as s:
        return s.logits(ids)


def f32_check(ir: ModelIR, rate: float, out: Path, ids: list[int], ref: np.ndarray, threads: int) -> float:
    """Max |llama.cpp - reference| of the F32 file at ``rate`` (F32 KV cache); file removed after."""
    path = out / f"f32-check-r{rate:g}.gguf"
    write_gguf_at_rate(ir, rate, path, 32)
    try:
        return float(np.abs(llama_logits(path, ids, threads, kv="f32") - ref).max())
    finally:
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cache" / "smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgeq-bench-gguf-rates"))
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--rates", default="0,0.15,0.25,0.35")
    ap.add_argument("--plan", choices=("hand", "uniform"), default="hand")
    ap.add_argument("--sort", choices=("naive", "none"), default="naive")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--f32-check", action="store_true",
                    help="also write each rate as F32 (one at a time) and compare with the reference")
    args = ap.parse_args()

    rates = sorted({0.0, *(float(x) for x in args.rates.split(","))})
    log(f"loading {args.model}")
    ir = load_model(args.model)
    hp = ir.hparams
    if args.sort == "naive":
        from edgeq.passes.naive_sort import naive_sort

        t = time.perf_counter()
        ir = naive_sort(ir)
        log(f"naive sort in {time.perf_counter() - t:.1f} s ({len(ir.rope_index)} layers with a rope_index)")
    if args.plan == "hand":
        spec = hand_spec(ir, rates)
    else:
        from edgeq.passes.rate_plan import plan_rates

        spec = plan_rates(ir, rates, granularity=GRANULARITY, mode="uniform")
    ir = ir.replace(prune=spec)
    ir.validate()
    gspec = gguf_prune_spec(ir)
    types = tensor_types(ir, args.type)

    out = args.out / f"{args.plan}-{args.sort}-{args.type}"
    t = time.perf_counter()
    files = write_gguf_rates(ir, out, types)
    write_s = time.perf_counter() - t
    log(f"wrote {len(files)} files in {write_s:.1f} s to {out}")

    total_prunable = prunable_params_removed(hp, [LayerWidths(0, 0, 0)] * hp.num_layers)
    ref_ir = reference_ir_for_gguf(ir)
    with LlamaCppSession(out / files[0.0], n_ctx=512, n_threads=args.threads) as s:
        ids = s.tokenize(SANITY_TEXT)
    from runtimes.reference import ReferenceSession

    ref_s = ReferenceSession(ref_ir, n_ctx=len(ids) + 1)
    refs = {}
    for r in gspec.rates:
        ref_s.set_prune_rate(r)
        refs[r] = ref_s.logits(ids)
    del ref_s
    rows = []
    for r in gspec.rates:
        path = out / files[r]
        ws = [w.ffn for w in gspec.at(r)]
        times = load_times(path, args.runs, args.threads)
        got, ref = llama_logits(path, ids, args.threads), refs[r]
        top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        f32 = f32_check(ir, r, out, ids, ref, args.threads) if args.f32_check else None
        from gguf import GGUFReader

        arch = GGUFReader(str(path)).fields["general.architecture"].contents()
        rows.append({
            "rate": r, "file": files[r], "bytes": path.stat().st_size, "arch": arch,
            "ffn_min": min(ws), "ffn_max": max(ws), "ffn_widths": ws,
            "realised_rate": prunable_params_removed(hp, gspec.at(r)) / total_prunable,
            "plan_realised_rate": prunable_params_removed(hp, spec.at(r)) / total_prunable,
            "load_s_median": statistics.median(times), "load_s_min": min(times), "load_s_all": times,
            "top1_vs_reference": top1, "max_rel_diff_vs_reference": rel,
            "reference_top1_vs_rate0": float((refs[r].argmax(-1) == refs[0.0].argmax(-1)).mean()),
            "f32_max_abs_diff_vs_reference": f32,
        })
        log(f"r={r:g}: {rows[-1]['bytes'] / 1e6:.2f} MB, load median {rows[-1]['load_s_median'] * 1e3:.1f} ms")
    total = sum(x["bytes"] for x in rows)
    r0 = rows[0]["bytes"]
    result = {
        "model": str(args.model), "type": args.type, "plan": args.plan, "sort": args.sort, "rates": rates,
        "granularity": GRANULARITY, "runs": args.runs, "threads": args.threads, "n_ctx": 512,
        "machine": platform.platform(), "processor": platform.processor(), "write_all_s": write_s,
        "sanity_tokens": len(ids), "rows": rows, "total_bytes": total, "overhead_vs_rate0": total / r0,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    print(f"\nGGUF at a rate — {args.model.name}, {args.type}, plan {args.plan}, sort {args.sort}, "
          f"load = LlamaCppSession(n_ctx=512, {args.threads} threads), median of {args.runs}, warm page cache\n")
    print(f"top-1 / rel diff: the {args.type} file in llama.cpp vs the fp32 reference on the same plan "
          f"({len(ids)} positions); ref top-1 vs r0: the reference at the rate vs unpruned; "
          f"F32 max|diff|: the F32 file vs the reference (--f32-check)\n")
    print("| rate | file | arch | MB | ffn min-max | realised rate | load ms (median / min) | top-1 vs ref "
          "| max rel diff | ref top-1 vs r0 | F32 max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        f32 = "-" if x["f32_max_abs_diff_vs_reference"] is None else f"{x['f32_max_abs_diff_vs_reference']:.1e}"
        print(f"| {x['rate']:g} | {x['file']} | {x['arch']} | {x['bytes'] / 1e6:.2f} | {x['ffn_min']}-{x['ffn_max']} | "
              f"{x['realised_rate']:.4f} | {x['load_s_median'] * 1e3:.1f} / {x['load_s_min'] * 1e3:.1f} | "
              f"{x['top1_vs_reference']:.3f} | {x['max_rel_diff_vs_reference']:.4f} | "
              f"{x['reference_top1_vs_rate0']:.3f} | {f32} |")
    print(f"\nall files: {total / 1e6:.2f} MB = {total / r0:.3f} x the rate-0 file ({r0 / 1e6:.2f} MB); "
          f"writing all took {write_s:.1f} s")


if __name__ == "__main__":
    main()

"""`edgeq profile`: time to first token, prefill and decode tok/s, peak RSS, artifact size.

Protocol (../shared/design/BENCHMARK_PROTOCOL.md): greedy decode of ``max_tokens`` new tokens
from "Once upon a time", one warm-up run, then the median of ``runs``; tok/s excludes prefill.
Prefill: synthetic prompts of exactly 128 and 512 tokens, tok/s = prompt tokens / TTFT.
"""
from __future__ import annotations

import platform
import resource
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from edgeq import roofline
from edgeq.artifact import read_manifest
from edgeq.backends import for_manifest
from edgeq.ir import HParams
from edgeq.session import artifact_rates, gguf_file_for_rate, open_session

DECODE_PROMPT = "Once upon a time"
PREFILL_TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the annual "
                "budget, and rain falls softly on the old stone bridge near the harbour. ")


def peak_rss_bytes() -> int:
    """This process's peak RSS. Linux: VmHWM of /proc/self/status — ``ru_maxrss`` survives
    fork + exec, so a child of a large parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def prompt_of_length(session, n: int) -> list[int]:
    unit = session.tokenize(PREFILL_TEXT, add_special=False)
    ids = (unit * (n // max(1, len(unit)) + 1))[:n]
    return ids


def _n_ctx(max_tokens: int, prefill_lengths: tuple[int, ...]) -> int:
    return max(max(prefill_lengths, default=0), max_tokens + 64) + 8


def measure(session, runs: int, max_tokens: int, prefill_lengths: tuple[int, ...]) -> dict:
    """Timings of an open session at its current settings (protocol in the module docstring)."""
    ids = session.tokenize(DECODE_PROMPT)
    list(session.generate_ids(ids, max_tokens, stop_at_eos=False))  # warm-up
    decode, ttft = [], []
    for _ in tqdm(range(runs), desc="decode runs", leave=False):
        list(session.generate_ids(ids, max_tokens, stop_at_eos=False))
        st = session.last_stats
        decode.append(st.decode_tok_s)
        ttft.append(st.prefill_seconds)
    prefill = {}
    for n in prefill_lengths:
        p = prompt_of_length(session, n)
        times = []
        for _ in range(max(1, min(runs, 3))):
            list(session.generate_ids(p, 1, stop_at_eos=False))
            times.append(session.last_stats.prefill_seconds)
        prefill[str(n)] = {"ttft_s": statistics.median(times), "tok_s": n / statistics.median(times)}
    return {"ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(decode),
            "decode_tok_s_runs": decode, "decode_tokens": max_tokens, "prefill": prefill, "runs": runs}


def _resident_bytes(session, m: dict, rate: float) -> int:
    if hasattr(session, "resident_weight_bytes"):
        return int(session.resident_weight_bytes())
    return int(m["files"][gguf_file_for_rate(m, rate)]["bytes"])


def _header(root: Path, m: dict, session) -> dict:
    return {
        "artifact": str(root), "format": m["format"], "target": m["target"], "weight_type": m.get("weight_type"),
        "runtime": session.name, "runtime_version": getattr(session, "version", None),
        "threads": getattr(session, "n_threads", None), "host": platform.machine(),
        "artifact_bytes": sum(f["bytes"] for f in m["files"].values()),
    }


def profile(artifact_dir: str | Path, runtime: str = "auto", runs: int = 5, max_tokens: int = 128,
            prefill_lengths: tuple[int, ...] = (128, 512), threads: int | None = None,
            prune: float | None = None) -> dict:
    root = Path(artifact_dir)
    m = read_manifest(root)
    rate = 0.0 if prune is None else float(prune)
    t0 = time.perf_counter()
    session = open_session(root, runtime=runtime, n_ctx=_n_ctx(max_tokens, prefill_lengths), threads=threads,
                           manifest=m, prune=rate)
    load_s = time.perf_counter() - t0
    with session:
        out = _header(root, m, session)
        out.update(load_s=load_s, prune_rate=rate, resident_weight_bytes=_resident_bytes(session, m, rate))
        out.update(measure(session, runs, max_tokens, prefill_lengths))
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["roofline"] = roofline_section(m, out, max_tokens, prefill_lengths)
    return out


def roofline_section(m: dict, out: dict, max_tokens: int, prefill_lengths: tuple[int, ...]) -> dict:
    """Predicted decode / prefill speed of this artifact on every hardware profile (bytes and
    FLOPs per token vs bandwidth and peak), and on this host: predicted vs measured."""
    hp = HParams.from_json(m["hparams"])
    fraction = 1.0
    widths = (m.get("prune") or {}).get("widths", {}).get(f"{out['prune_rate']:g}")
    if widths:  # the matmul weights a token runs at this rate
        H, KV, h = hp.num_heads, hp.num_kv_heads, hp.hidden_size
        run = sum(h * (2 * w["qk_pairs"] * (H + KV) + w["v_dims"] * (KV + H) + 3 * w["ffn"]) for w in widths)
        fraction = (run + hp.vocab_size * h) / roofline.matmul_params(hp)
    cost = roofline.token_cost(hp, out["resident_weight_bytes"], matmul_fraction=min(1.0, fraction))
    context = len(DECODE_PROMPT.split()) + max_tokens // 2  # mean cached positions over the decode run
    prompt = max(prefill_lengths) if prefill_lengths else 512
    runtime, wt = out.get("runtime", ""), out.get("weight_type")
    host = roofline.measure_host()
    peak_host = host["fp32_matmul_tflops"]
    pred = roofline.predict(cost, host["read_bandwidth_gb_s"], peak_host, context, prompt)
    measured_prefill = out["prefill"].get(str(prompt), {}).get("tok_s")
    return {
        "token_cost": cost.to_json(), "context": context, "prompt": prompt,
        "profiles": roofline.for_profiles(cost, runtime, wt, context, prompt),
        "host": {**host, "predicted": pred, "measured_decode_tok_s": out["decode_tok_s"],
                 "decode_fraction_of_roofline": out["decode_tok_s"] / pred["decode_tok_s"],
                 "measured_prefill_tok_s": measured_prefill,
                 "prefill_fraction_of_roofline": (measured_prefill / pred["prefill_tok_s"]) if measured_prefill else None,
                 "peak_kind": "fp32 (numpy matmul measured here)"},
    }


def profile_sweep(artifact_dir: str | Path, runtime: str = "auto", runs: int = 5, max_tokens: int = 128,
                  prefill_lengths: tuple[int, ...] = (128,), threads: int | None = None) -> dict:
    """Every carried pruning rate. Reference, ONNX and TVM artifacts switch in place (``set_prune_rate``, timed);
    GGUF artifacts load the rate's own file (the reload time is the switch cost)."""
    root = Path(artifact_dir)
    m = read_manifest(root)
    n_ctx = _n_ctx(max_tokens, prefill_lengths)
    rows = []
    if for_manifest(m).switches_in_place:
        t0 = time.perf_counter()
        session = open_session(root, runtime=runtime, n_ctx=n_ctx, threads=threads, manifest=m)
        load_s = time.perf_counter() - t0
        with session:
            head = _header(root, m, session)
            for rate in artifact_rates(m):
                switch = []
                for _ in range(101):
                    t = time.perf_counter()
                    session.set_prune_rate(rate)
                    switch.append(time.perf_counter() - t)
                row = {"prune_rate": rate, "switch_s": statistics.median(switch), "switch": "in place, no copy",
                       "resident_weight_bytes": _resident_bytes(session, m, rate)}
                row.update(measure(session, runs, max_tokens, prefill_lengths))
                rows.append(row)
        head["load_s"] = load_s
    else:
        head = None
        for rate in artifact_rates(m):
            t0 = time.perf_counter()
            session = open_session(root, runtime=runtime, n_ctx=n_ctx, threads=threads, manifest=m, prune=rate)
            load_s = time.perf_counter() - t0
            with session:
                head = head or _header(root, m, session)
                row = {"prune_rate": rate, "switch_s": load_s, "switch": "reload of the rate's file",
                       "resident_weight_bytes": _resident_bytes(session, m, rate)}
                row.update(measure(session, runs, max_tokens, prefill_lengths))
                rows.append(row)
    base = rows[0]["decode_tok_s"] or 1.0
    for r in rows:
        r["decode_speedup_vs_rate0"] = r["decode_tok_s"] / base
    head.update(rates=rows, peak_rss_bytes=peak_rss_bytes())
    return head


def format_sweep(p: dict) -> str:
    lines = [f"{p['artifact']}: {p['format']} / {p['target']} / {p['weight_type']} on {p['runtime']}",
             f"{'rate':>6}  {'switch':>10}  {'decode tok/s':>12}  {'x rate 0':>8}  {'TTFT ms':>8}  {'weights MB':>10}"]
    for r in p["rates"]:
        sw = r["switch_s"]
        sw_s = f"{sw * 1e6:.1f}us" if sw < 1e-3 else f"{sw * 1e3:.1f}ms"
        lines.append(f"{r['prune_rate']:>6g}  {sw_s:>10}  {r['decode_tok_s']:>12.1f}  "
                     f"{r['decode_speedup_vs_rate0']:>8.3f}  {r['ttft_s'] * 1000:>8.1f}  "
                     f"{r['resident_weight_bytes'] / 1e6:>10.1f}")
    lines.append(f"switch: {p['rates'][-1]['switch']}")
    return "\n".join(lines)


def format_profile(p: dict) -> str:
    rows = [
        ("artifact", p["artifact"]),
        ("format / target / weights", f"{p['format']} / {p['target']} / {p['weight_type']}"),
        ("runtime", f"{p['runtime']} {p['runtime_version'] or ''} ({p['threads']} threads)".strip()),
        ("load time", f"{p['load_s']:.2f} s"),
        ("pruning rate", f"{p['prune_rate']:g} (resident weights {p['resident_weight_bytes'] / 1e6:.1f} MB)"),
        ("time to first token", f"{p['ttft_s'] * 1000:.1f} ms (prompt '{DECODE_PROMPT}')"),
        ("decode", f"{p['decode_tok_s']:.1f} tok/s (median of {p['runs']}, {p['decode_tokens']} tokens)"),
    ]
    for n, v in p["prefill"].items():
        rows.append((f"prefill {n} tokens", f"{v['tok_s']:.1f} tok/s (TTFT {v['ttft_s'] * 1000:.1f} ms)"))
    rows += [
        ("peak RSS", f"{p['peak_rss_bytes'] / 2**20:.1f} MiB"),
        ("artifact size", f"{p['artifact_bytes'] / 1e6:.1f} MB (weights run at this rate {p['resident_weight_bytes'] / 1e6:.1f} MB)"),
    ]
    r = p.get("roofline")
    if r:
        h = r["host"]
        rows.append(("roofline (this host)",
                     f"decode bound {h['predicted']['decode_tok_s']:.0f} tok/s ({h['predicted']['decode_bound']}, "
                     f"{h['read_bandwidth_gb_s']:.1f} GB/s read, {h['fp32_matmul_tflops'] * 1e3:.0f} GFLOPS fp32): "
                     f"measured {100 * h['decode_fraction_of_roofline']:.0f} % of it"))
        best = max(r["profiles"], key=lambda x: x["decode_tok_s"])
        rows.append(("roofline (profiles)", ", ".join(f"{x['profile']} {x['decode_tok_s']:.0f}" for x in r["profiles"])
                     + f" tok/s decode bound (best: {best['profile']})"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

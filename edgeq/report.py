"""`edgeq profile A [B ...] --report out.html [--markdown out.md] [--json out.json] [--quick]`:
one self-contained report a deployment engineer can attach to a release.

Per artifact: TTFT and prefill tok/s over prompt lengths, decode tok/s over generation lengths
(median and spread of repeated runs after a warm-up), peak RSS and the weight bytes a token reads,
a sweep over every pruning rate the artifact carries, a per-layer / per-op breakdown where the
runtime allows it (:mod:`edgeq.breakdown`), the roofline on every hardware profile and on this
host (:mod:`edgeq.roofline`), and quality numbers from ``edgeq eval --json`` when a file
``<artifact>.eval.json`` sits next to the artifact. Outputs: JSON (schema below), Markdown, HTML
with inline SVG plots (matplotlib): decode tok/s vs rate per artifact, prefill vs prompt length,
a stacked per-layer breakdown, a roofline chart and the predicted decode speed per profile.

JSON schema ``edgeq.profile-report/1``::

    {"schema", "created_utc", "command", "machine": {"cpu", "cores", "threads", "platform", "python"},
     "settings": {"runs", "prompt_lengths", "generation_lengths", "quick"},
     "artifacts": [{"artifact", "format", "target", "weight_type", "runtime", "artifact_bytes",
                    "profile": <edgeq profile --json of rate 0>,
                    "generation": {"<n>": {"decode_tok_s", "runs": [...]}},
                    "rates": [<edgeq profile --prune all rows>] | null,
                    "breakdown": <edgeq.breakdown result>, "quality": <eval json> | null}]}
"""
from __future__ import annotations

import datetime
import html
import io
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from edgeq.artifact import read_manifest
from edgeq.breakdown import breakdown
from edgeq.profile import measure, profile, profile_sweep
from edgeq.session import artifact_rates, open_session

SCHEMA = "edgeq.profile-report/1"


def machine(threads: int | None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


def spread(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "p25": q[0], "p75": q[2], "n": len(xs)}


def _quality(artifact: Path) -> dict | None:
    p = artifact.parent / f"{artifact.name}.eval.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return {"error": f"{p}: not JSON"}
    return None


def profile_isolated(path: Path, **kw) -> dict:
    """:func:`edgeq.profile.profile` of one artifact in a fresh (spawned) process, so that its peak
    RSS is that artifact's alone: in one process every later artifact's peak included the earlier
    ones' (the process's high-water mark; llama.cpp's and onnxruntime's buffers and libraries)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(profile, path, **kw).result()


def build_report(artifacts: list[Path], runtime: str = "auto", threads: int | None = None, quick: bool = False,
                 log: Callable[[str], None] = lambda m: None) -> dict:
    runs = 2 if quick else 5
    prompts = (16, 128) if quick else (16, 128, 512)
    gens = (32,) if quick else (32, 128)
    steps = 8 if quick else 24
    out = {"schema": SCHEMA, "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "machine": machine(threads),
           "settings": {"runs": runs, "prompt_lengths": list(prompts), "generation_lengths": list(gens),
                        "quick": quick}, "artifacts": []}
    bar = tqdm(total=len(artifacts) * 4, desc="profiling", unit="step", leave=False)
    for path in artifacts:
        path = Path(path)
        m = read_manifest(path)
        log(f"profiling {path} ({m['format']})")
        prof = profile_isolated(path, runtime=runtime, runs=runs, max_tokens=max(gens), prefill_lengths=prompts,
                                threads=threads)
        bar.update()
        gen = {str(max(gens)): {"decode_tok_s": prof["decode_tok_s"], "runs": prof["decode_tok_s_runs"],
                                "spread": spread(prof["decode_tok_s_runs"])}}
        with open_session(path, runtime=runtime, n_ctx=max(prompts) + max(gens) + 16, threads=threads,
                          manifest=m) as s:
            for g in gens:
                if str(g) not in gen:
                    r = measure(s, runs, g, ())
                    gen[str(g)] = {"decode_tok_s": r["decode_tok_s"], "runs": r["decode_tok_s_runs"],
                                   "spread": spread(r["decode_tok_s_runs"])}
            bar.update()
            bd = breakdown(s, steps)
        bar.update()
        rates = None
        if len(artifact_rates(m)) > 1:
            rates = profile_sweep(path, runtime=runtime, runs=runs, max_tokens=max(gens), prefill_lengths=(128,),
                                  threads=threads)["rates"]
        bar.update()
        out["artifacts"].append({
            "artifact": str(path), "format": m["format"], "target": m.get("target"), "weight_type": m.get("weight_type"),
            "runtime": prof["runtime"], "artifact_bytes": prof["artifact_bytes"], "profile": prof,
            "decode_spread": spread(prof["decode_tok_s_runs"]), "generation": gen, "rates": rates,
            "breakdown": bd, "quality": _quality(path)})
    bar.close()
    return out


# ---- rendering ---------------------------------------------------------------------------------
def _name(a: dict) -> str:
    return Path(a["artifact"]).name


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    s = buf.getvalue()
    return s[s.index("<svg"):]


def figures(rep: dict) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    arts = rep["artifacts"]
    figs = {}
    # 1. decode tok/s vs pruning rate, one line per artifact
    fig, ax = plt.subplots(figsize=(7, 4))
    for a in arts:
        rows = a["rates"] or [{"prune_rate": 0.0, "decode_tok_s": a["profile"]["decode_tok_s"]}]
        ax.plot([r["prune_rate"] for r in rows], [r["decode_tok_s"] for r in rows], marker="o",
                label=f"{_name(a)} ({a['format']})")
    ax.set_xlabel("pruning rate")
    ax.set_ylabel("decode tok/s")
    ax.set_title("Decode speed vs pruning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figs["rates"] = _svg(fig)
    # 2. prefill tok/s vs prompt length
    fig, ax = plt.subplots(figsize=(7, 4))
    for a in arts:
        pf = a["profile"]["prefill"]
        ns = sorted(int(n) for n in pf)
        ax.plot(ns, [pf[str(n)]["tok_s"] for n in ns], marker="o", label=_name(a))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill tok/s")
    ax.set_title("Prefill speed vs prompt length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figs["prefill"] = _svg(fig)
    # 3. stacked per-layer breakdown, one panel per artifact that has one
    with_bd = [a for a in arts if a["breakdown"].get("available")]
    if with_bd:
        fig, axes = plt.subplots(len(with_bd), 1, figsize=(8, 2.8 * len(with_bd)), squeeze=False)
        for ax, a in zip(axes[:, 0], with_bd):
            layers = a["breakdown"]["by_layer"]
            cats = sorted({c for row in layers for c in row})
            bottom = [0.0] * len(layers)
            for c in cats:
                vals = [row.get(c, 0.0) for row in layers]
                ax.bar(range(len(layers)), vals, bottom=bottom, label=c)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_title(f"{_name(a)}: per-layer time per decode token ({a['breakdown']['runtime']})", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_xticks(range(0, len(layers), max(1, len(layers) // 15)))
            ax.set_ylabel("ms")
            ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        figs["breakdown"] = _svg(fig)
    # 4. roofline on this host + the artifacts' measured decode
    host = next((a["profile"]["roofline"]["host"] for a in arts if a["profile"].get("roofline")), None)
    if host:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        bw, peak = host["read_bandwidth_gb_s"] * 1e9, host["fp32_matmul_tflops"] * 1e12
        xs = np.logspace(-2, 3, 100)
        ax.plot(xs, np.minimum(bw * xs, peak) / 1e9, color="k", label=f"this host: {bw / 1e9:.0f} GB/s, "
                                                                        f"{peak / 1e9:.0f} GFLOPS")
        for a in arts:
            r = a["profile"]["roofline"]
            b, f = r["token_cost"]["weight_bytes"] + r["token_cost"]["kv_bytes_per_position"] * r["context"], \
                r["token_cost"]["flops"] + r["token_cost"]["attention_flops_per_position"] * r["context"]
            ax.scatter([f / b], [a["profile"]["decode_tok_s"] * f / 1e9], s=40, label=f"{_name(a)} decode (measured)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / byte)")
        ax.set_ylabel("GFLOP/s")
        ax.set_title("Roofline on this host")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        figs["roofline"] = _svg(fig)
        # 5. predicted decode tok/s per profile
        fig, ax = plt.subplots(figsize=(8, 4))
        profs = [p["profile"] for p in arts[0]["profile"]["roofline"]["profiles"]]
        width = 0.8 / max(1, len(arts))
        for k, a in enumerate(arts):
            vals = [p["decode_tok_s"] for p in a["profile"]["roofline"]["profiles"]]
            ax.bar([i + k * width for i in range(len(profs))], vals, width=width, label=_name(a))
        ax.set_xticks([i + width * (len(arts) - 1) / 2 for i in range(len(profs))])
        ax.set_xticklabels(profs, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("predicted decode tok/s (roofline)")
        ax.set_title("Roofline decode bound per hardware profile")
        ax.legend(fontsize=7)
        figs["profiles"] = _svg(fig)
    return figs


def _tables(rep: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    arts = rep["artifacts"]
    t = []
    head = ["artifact", "format / weights", "runtime", "MB", "TTFT ms", "decode tok/s (median [p25-p75])",
            "peak RSS MiB", "weights / token MB", "host roofline %"]
    rows = []
    for a in arts:
        p, d = a["profile"], a["decode_spread"]
        h = (p.get("roofline") or {}).get("host", {})
        rows.append([_name(a), f"{a['format']} / {a['weight_type']}", f"{p['runtime']} ({p['threads']} thr)",
                     f"{a['artifact_bytes'] / 1e6:.1f}", f"{p['ttft_s'] * 1e3:.1f}",
                     f"{d['median']:.1f} [{d['p25']:.1f}-{d['p75']:.1f}]", f"{p['peak_rss_bytes'] / 2**20:.0f}",
                     f"{p['resident_weight_bytes'] / 1e6:.1f}",
                     f"{100 * h['decode_fraction_of_roofline']:.0f}" if h else "-"])
    t.append(("Summary", head, rows))
    prompts = rep["settings"]["prompt_lengths"]
    t.append(("Prefill tok/s by prompt length", ["artifact"] + [str(n) for n in prompts],
              [[_name(a)] + [f"{a['profile']['prefill'][str(n)]['tok_s']:.0f}" for n in prompts] for a in arts]))
    gens = rep["settings"]["generation_lengths"]
    t.append(("Decode tok/s by generation length", ["artifact"] + [str(n) for n in gens],
              [[_name(a)] + [f"{a['generation'][str(n)]['decode_tok_s']:.1f}" for n in gens] for a in arts]))
    rate_rows = [[_name(a), f"{r['prune_rate']:g}", f"{r['decode_tok_s']:.1f}", f"{r['decode_speedup_vs_rate0']:.2f}",
                  f"{r['resident_weight_bytes'] / 1e6:.1f}", r["switch"]]
                 for a in arts if a["rates"] for r in a["rates"]]
    if rate_rows:
        t.append(("Pruning-rate sweep", ["artifact", "rate", "decode tok/s", "x rate 0", "weights MB", "switch"],
                  rate_rows))
    profs = [p["profile"] for p in arts[0]["profile"]["roofline"]["profiles"]] if arts and arts[0]["profile"].get(
        "roofline") else []
    if profs:
        t.append(("Roofline decode bound per hardware profile (tok/s; bound)", ["artifact"] + profs,
                  [[_name(a)] + [f"{p['decode_tok_s']:.0f} ({p['decode_bound'][0]})"
                                 for p in a["profile"]["roofline"]["profiles"]] for a in arts]))
        host_rows = []
        for a in arts:
            h = a["profile"]["roofline"]["host"]
            host_rows.append([_name(a), f"{h['predicted']['decode_tok_s']:.0f}", f"{h['measured_decode_tok_s']:.1f}",
                              f"{100 * h['decode_fraction_of_roofline']:.0f} %",
                              f"{h['predicted']['prefill_tok_s']:.0f}",
                              f"{h['measured_prefill_tok_s']:.0f}" if h['measured_prefill_tok_s'] else "-"])
        t.append(("This host: roofline vs measured", ["artifact", "decode bound", "decode measured", "fraction",
                                                      "prefill bound", "prefill measured"], host_rows))
    bd_rows = []
    for a in arts:
        b = a["breakdown"]
        if b.get("available"):
            cats = ", ".join(f"{c} {v:.2f}" for c, v in sorted(b["by_category"].items(), key=lambda kv: -kv[1]))
            bd_rows.append([_name(a), f"{b['per_token_ms']:.2f}", cats, b["method"]])
        else:
            bd_rows.append([_name(a), "-", "not available", b["method"]])
    t.append(("Where a decode token's time goes (ms per token)", ["artifact", "total", "by category", "method"], bd_rows))
    q_rows = [[_name(a), json.dumps(a["quality"])[:200]] for a in arts if a.get("quality")]
    if q_rows:
        t.append(("Quality (edgeq eval --json next to the artifact)", ["artifact", "eval"], q_rows))
    return t


def _gap_notes(rep: dict) -> list[str]:
    notes = []
    for a in rep["artifacts"]:
        r = a["profile"].get("roofline")
        if not r:
            continue
        h = r["host"]
        frac = h["decode_fraction_of_roofline"]
        b = a["breakdown"]
        why = ("per-call runtime overheads and kernels below the memory roofline"
               if frac < 0.7 else "close to the memory roofline")
        if b.get("available"):
            top = max(b["by_category"].items(), key=lambda kv: kv[1])
            why += f"; the largest share of a decode token is {top[0]} ({top[1]:.2f} of {b['per_token_ms']:.2f} ms)"
        notes.append(f"{_name(a)}: decode reaches {100 * frac:.0f} % of this host's {h['predicted']['decode_bound']}-"
                     f"bound roofline ({h['predicted']['decode_tok_s']:.0f} tok/s from {r['token_cost']['weight_bytes'] / 1e6:.1f} MB "
                     f"per token at {h['read_bandwidth_gb_s']:.1f} GB/s) — {why}.")
    return notes


def to_markdown(rep: dict) -> str:
    mc = rep["machine"]
    lines = ["# edgeq profile report", "",
             f"- machine: {mc['cpu']}, {mc['cores']} cores, {mc['threads']} threads used; {mc['platform']}",
             f"- command: `{rep['command']}`", f"- created: {rep['created_utc']}; runs per measurement: "
             f"{rep['settings']['runs']}{' (quick)' if rep['settings']['quick'] else ''}", ""]
    for title, head, rows in _tables(rep):
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        lines.append("")
    notes = _gap_notes(rep)
    if notes:
        lines += ["## Roofline gap", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def to_html(rep: dict) -> str:
    mc = rep["machine"]
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>edgeq profile report</title><style>",
             "body{font-family:sans-serif;margin:24px;max-width:1100px} table{border-collapse:collapse;margin:8px 0 20px}"
             "td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px} th{background:#eee} figure{margin:10px 0}"
             "</style></head><body><h1>edgeq profile report</h1>",
             f"<p>machine: {e(mc['cpu'])}, {mc['cores']} cores, {mc['threads']} threads used; {e(mc['platform'])}<br>"
             f"command: <code>{e(rep['command'])}</code><br>created {e(rep['created_utc'])}; runs per measurement "
             f"{rep['settings']['runs']}{' (quick)' if rep['settings']['quick'] else ''}</p>"]
    figs = figures(rep)
    order = [("rates", "Decode tok/s vs pruning rate"), ("breakdown", "Per-layer breakdown"),
             ("roofline", "Roofline"), ("profiles", "Predicted decode per hardware profile"),
             ("prefill", "Prefill vs prompt length")]
    for title, head, rows in _tables(rep):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    notes = _gap_notes(rep)
    if notes:
        parts.append("<h2>Roofline gap</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    if figs:
        parts.append("<h2>Plots</h2>")
        for key, title in order:
            if key in figs:
                parts.append(f"<figure><figcaption>{e(title)}</figcaption>{figs[key]}</figure>")
    else:
        parts.append("<p>(plots need matplotlib: pip install 'edgeq[report]')</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(rep: dict, html_path: Path | None = None, md_path: Path | None = None,
                  json_path: Path | None = None) -> None:
    for path, text in ((json_path, lambda: json.dumps(rep, indent=1, sort_keys=True) + "\n"),
                       (md_path, lambda: to_markdown(rep)), (html_path, lambda: to_html(rep))):
        if path is not None:
            path = Path(path)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text(), encoding="utf-8")
            tmp.replace(path)

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

from edgeq.artifact import read_manifest
from edgeq.session import open_session

DECODE_PROMPT = "Once upon a time"
PREFILL_TEXT = ("The quick brown fox jumps over the lazy dog while the committee reviews the annual "
                "budget, and rain falls softly on the old stone bridge near the harbour. ")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def prompt_of_length(session, n: int) -> list[int]:
    unit = session.tokenize(PREFILL_TEXT, add_special=False)
    ids = (unit * (n // max(1, len(unit)) + 1))[:n]
    return ids


def profile(artifact_dir: str | Path, runtime: str = "auto", runs: int = 5, max_tokens: int = 128,
            prefill_lengths: tuple[int, ...] = (128, 512), threads: int | None = None) -> dict:
    root = Path(artifact_dir)
    m = read_manifest(root)
    t0 = time.perf_counter()
    n_ctx = max(max(prefill_lengths, default=0), max_tokens + 64) + 8
    session = open_session(root, runtime=runtime, n_ctx=n_ctx, threads=threads, manifest=m)
    load_s = time.perf_counter() - t0
    with session:
        ids = session.tokenize(DECODE_PROMPT)
        list(session.generate_ids(ids, max_tokens, stop_at_eos=False))  # warm-up
        decode, ttft = [], []
        from tqdm import tqdm

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
        runtime_name = session.name
        runtime_version = getattr(session, "version", None)
    size = sum(f["bytes"] for f in m["files"].values())
    return {
        "artifact": str(root),
        "format": m["format"],
        "target": m["target"],
        "weight_type": m.get("weight_type"),
        "runtime": runtime_name,
        "runtime_version": runtime_version,
        "threads": getattr(session, "n_threads", None),
        "host": platform.machine(),
        "load_s": load_s,
        "ttft_s": statistics.median(ttft),
        "decode_tok_s": statistics.median(decode),
        "decode_tok_s_runs": decode,
        "decode_tokens": max_tokens,
        "prefill": prefill,
        "peak_rss_bytes": peak_rss_bytes(),
        "artifact_bytes": size,
        "model_bytes": m["files"][m["model_file"]]["bytes"],
        "runs": runs,
    }


def format_profile(p: dict) -> str:
    rows = [
        ("artifact", p["artifact"]),
        ("format / target / weights", f"{p['format']} / {p['target']} / {p['weight_type']}"),
        ("runtime", f"{p['runtime']} {p['runtime_version'] or ''} ({p['threads']} threads)".strip()),
        ("load time", f"{p['load_s']:.2f} s"),
        ("time to first token", f"{p['ttft_s'] * 1000:.1f} ms (prompt '{DECODE_PROMPT}')"),
        ("decode", f"{p['decode_tok_s']:.1f} tok/s (median of {p['runs']}, {p['decode_tokens']} tokens)"),
    ]
    for n, v in p["prefill"].items():
        rows.append((f"prefill {n} tokens", f"{v['tok_s']:.1f} tok/s (TTFT {v['ttft_s'] * 1000:.1f} ms)"))
    rows += [
        ("peak RSS", f"{p['peak_rss_bytes'] / 2**20:.1f} MiB"),
        ("artifact size", f"{p['artifact_bytes'] / 1e6:.1f} MB (model file {p['model_bytes'] / 1e6:.1f} MB)"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

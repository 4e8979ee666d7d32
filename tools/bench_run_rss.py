"""Memory of running an artifact (issue 14, item 6): open it, prefill a prompt, generate greedy
tokens, and report the process's peak RSS and its anonymous (private) / file-backed parts.

    .venv/bin/python tools/bench_run_rss.py ARTIFACT [--tokens 32] [--ctx 256] [--threads 2]

Prints one JSON line: weight bytes (the artifact's weights file), KV cache bytes, VmHWM (peak
RSS), RssAnon / RssFile after opening, after the first ``tokenize`` and at the end (Linux
/proc/self/status), load / prefill / decode seconds.
A runtime that memory-maps its weights has RssAnon ~ KV cache + activations + the interpreter,
and its weights in RssFile (page cache, shared, dropped under memory pressure); one that copies
them at load has them in RssAnon.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from edgeq.artifact import read_manifest
    from edgeq.session import open_session

    m = read_manifest(a.artifact)
    vocab = {(m.get(k) or {}).get("tokenizer_vocab_file") for k in ("onnx", "tvm")}  # the packed tokenizer is not weights
    weights = sum(f["bytes"] for name, f in m["files"].items() if name.endswith(".safetensors") and name not in vocab)
    base = status()
    t0 = time.perf_counter()
    s = open_session(a.artifact, n_ctx=a.ctx, threads=a.threads)
    t_load = time.perf_counter() - t0
    after_load = status()
    prompt = s.tokenize("The capital of France is")
    after_tokenize = status()  # the tokenizer is built on first use (Gemma 3's 262k vocabulary: ~13 MB packed, hundreds of MB through the tokenizers library)
    toks = list(s.generate_ids(prompt, a.tokens, stop_at_eos=False))
    st = s.last_stats
    end = status()
    kv = sum(getattr(s, n).nbytes for n in ("_k", "_v") if hasattr(s, n))
    print(json.dumps({"artifact": str(a.artifact), "format": m["format"], "weight_bytes": weights, "kv_bytes": kv,
                      "tokens": len(toks), "load_s": round(t_load, 2), "prefill_s": round(st.prefill_seconds, 2),
                      "decode_s": round(st.decode_seconds, 2), "start": base, "after_load": after_load,
                      "after_tokenize": after_tokenize, "end": end,
                      **{k: getattr(s, k) for k in ("mapped_weights", "copied_weights") if hasattr(s, k)}}))


if __name__ == "__main__":
    main()

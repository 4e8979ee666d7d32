"""Issue 5 benchmark: edgeq ONNX artifacts on onnxruntime vs llama.cpp GGUFs of the same bits.

    .venv/bin/python tools/bench_onnx.py [--bits 8,4] [--ppl-tokens 8192] [--kl-tokens 2048]
        [--runs 5] [--threads 2] [--out out/bench-onnx]

SmolLM2-135M-Instruct (the source model, no adapter; ``--model DIR`` another checkpoint, e.g.
models/cache/gemma3-270m), built for cpu-avx2:
  * ``onnx-int8`` / ``onnx-int4``: ``edgeq build --format onnx --bits B`` (MatMulNBits, block 32,
    symmetric, accuracy_level 4; embedding/head int8), run by onnxruntime;
  * ``gguf-Q8_0`` / ``gguf-Q4_0``: ``edgeq build --format gguf --bits B`` (byte-identical to
    llama.cpp's own quantization; embedding Q8_0 in the 4-bit file), run by llama.cpp.
Quality (edgeq.evaluate, one code path): wikitext-2 perplexity (ctx 512, second half of each
window scored, first N scored positions) and KL(reference ‖ artifact) + top-1 on the first
``--kl-tokens`` of those positions, where the reference is edgeq's numpy runtime (float64) on
*the artifact's own dequantized weights*: it isolates what the runtime adds (activation
quantization, kernels, KV cache), and also vs the fp32 model (what the format loses).
Speed (edgeq.profile.measure, one fresh process per artifact so peak RSS is its own, A B A B
interleaved over ``--rounds``): decode tok/s (128 greedy tokens, median of runs), prefill tok/s
of a 128-token prompt, peak RSS. Writes OUT/results.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from child_json import speed_rounds  # noqa: E402

MODEL = REPO / "models" / "cache" / "smollm2-135m-instruct"
GGUF_TYPE = {8: "Q8_0", 4: "Q4_0"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_all(bits: list[int], out: Path) -> dict[str, Path]:
    arts = {}
    for b in bits:
        for fmt, name in (("onnx", f"onnx-int{b}"), ("gguf", f"gguf-{GGUF_TYPE[b]}")):
            path = out / name
            if not (path / "manifest.json").exists():
                log(f"building {name}")
                subprocess.run([sys.executable, "-m", "edgeq.cli", "build", str(MODEL), "--target", "cpu-avx2",
                                "--format", fmt, "--bits", str(b), "-o", str(path), "--force"], check=True, cwd=REPO)
            arts[name] = path
    return arts


def own_weights_reference(path: Path):
    """The float model an artifact computes with (its dequantized weights) in the reference runtime."""
    from edgeq.artifact import read_manifest
    from runtimes.reference import ReferenceSession

    m = read_manifest(path)
    if m["format"] == "gguf":
        from edgeq.backends.gguf.lower import read_gguf

        return ReferenceSession(read_gguf(path / m["model_file"]), n_ctx=600, dtype=np.float64)
    from edgeq.frontend import load_model
    from edgeq.backends.onnx.lower import OnnxOptions, lowered_ir

    w = m["onnx"]["weights"]
    return ReferenceSession(lowered_ir(load_model(MODEL), OnnxOptions(**w)), n_ctx=600, dtype=np.float64)


def quality(arts: dict[str, Path], ppl_tokens: int, kl_tokens: int, threads: int) -> dict:
    from edgeq.evaluate import evaluate_wikitext, wikitext2_test_text
    from edgeq.frontend import load_model
    from edgeq.session import open_session
    from runtimes.reference import ReferenceSession

    fp32 = ReferenceSession(load_model(MODEL), n_ctx=600, dtype=np.float64)
    tokens = list(fp32.tokenize(wikitext2_test_text(), add_special=False))
    res = {}
    for name, path in arts.items():
        log(f"quality: {name}")
        s = open_session(path, n_ctx=600, threads=threads)
        ppl = evaluate_wikitext(s, None, tokens=tokens, max_tokens=ppl_tokens).perplexity
        own = own_weights_reference(path)
        kl_own = evaluate_wikitext(s, own, tokens=tokens, max_tokens=kl_tokens).kl
        kl_fp = evaluate_wikitext(s, fp32, tokens=tokens, max_tokens=kl_tokens).kl
        ids = tokens[:256]
        diff = float(np.abs(s.logits(ids) - own.logits(ids)).max())
        del own
        s.close()
        res[name] = {"ppl": ppl.ppl, "ppl_scored": ppl.scored_tokens, "kl_vs_own_weights": kl_own.mean_kl,
                     "top1_vs_own_weights": kl_own.top1_agreement, "max_abs_logit_diff_256": diff,
                     "kl_vs_fp32": kl_fp.mean_kl, "top1_vs_fp32": kl_fp.top1_agreement, "kl_scored": kl_own.count}
    return res


SPEED_CODE = """
import json, sys
sys.path.insert(0, {repo!r})
from edgeq.profile import measure, peak_rss_bytes
from edgeq.session import open_session
s = open_session({path!r}, n_ctx=512, threads={threads})
r = measure(s, runs={runs}, max_tokens=128, prefill_lengths=(128,))
r["peak_rss_bytes"] = peak_rss_bytes()
print(json.dumps(r))
"""


def speed(arts: dict[str, Path], runs: int, rounds: int, threads: int) -> dict:
    out = speed_rounds(arts, rounds, lambda path: SPEED_CODE.format(repo=str(REPO), path=str(path), threads=threads,
                                                                    runs=runs), log)
    res = {}
    for name, rs in out.items():
        res[name] = {"decode_tok_s": statistics.median(x for r in rs for x in r["decode_tok_s_runs"]),
                     "prefill_128_tok_s": statistics.median(r["prefill"]["128"]["tok_s"] for r in rs),
                     "peak_rss_mb": statistics.median(r["peak_rss_bytes"] for r in rs) / 1e6,
                     "decode_tok_s_by_round": [statistics.median(r["decode_tok_s_runs"]) for r in rs],
                     "rounds": len(rs), "runs_per_round": runs}
    return res


def main() -> None:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--kl-tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=["all", "quality", "speed"], default="all")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-onnx")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: SmolLM2)")
    a = ap.parse_args()
    MODEL = (a.model or MODEL).resolve()
    bits = [int(b) for b in a.bits.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    arts = build_all(bits, a.out)
    res_path = a.out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    res["sizes_mb"] = {n: sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".gguf", ".onnx", ".data"))
                       / 1e6 for n, p in arts.items()}
    if a.stage in ("all", "quality"):
        res["quality"] = quality(arts, a.ppl_tokens, a.kl_tokens, a.threads)
    if a.stage in ("all", "speed"):
        res["speed"] = speed(arts, a.runs, a.rounds, a.threads)
    res["command"] = " ".join(sys.argv)
    res_path.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(table(res))


def table(res: dict) -> str:
    q, s, sz = res.get("quality", {}), res.get("speed", {}), res["sizes_mb"]
    lines = ["| artifact | MB | ppl | KL vs own weights | top-1 | max abs logit diff | KL vs fp32 | decode tok/s "
             "| prefill tok/s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sz:
        qq, ss = q.get(n, {}), s.get(n, {})
        f = lambda d, k, fmt: format(d[k], fmt) if k in d else "-"  # noqa: E731
        lines.append(f"| {n} | {sz[n]:.1f} | {f(qq, 'ppl', '.2f')} | {f(qq, 'kl_vs_own_weights', '.2e')} | "
                     f"{f(qq, 'top1_vs_own_weights', '.3f')} | {f(qq, 'max_abs_logit_diff_256', '.3f')} | "
                     f"{f(qq, 'kl_vs_fp32', '.4f')} | {f(ss, 'decode_tok_s', '.1f')} | {f(ss, 'prefill_128_tok_s', '.0f')} | "
                     f"{f(ss, 'peak_rss_mb', '.0f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Issue 6 end-to-end benchmark: the TVM artifact (generated kernels + numpy decoder) vs llama.cpp
at the same bits, SmolLM2-135M-Instruct on cpu-avx2.

    .venv/bin/python tools/bench_tvm.py [--stage quality|speed|all] [--runs 5] [--rounds 2] [--threads 2]
        [--model DIR] [--out out/bench-tvm] [--onnx-out out/bench-onnx]

Artifacts (built if missing): ``tvm-int4`` = ``edgeq build --format tvm --bits 4`` (int4 group 32
symmetric, head int8) in out/bench-tvm, next to ``gguf-Q4_0`` / ``onnx-int4`` of
tools/bench_onnx.py (``--onnx-out``, default out/bench-onnx; ``--model``: another checkpoint than
SmolLM2, e.g. models/cache/gemma3-270m). Quality: wikitext-2 perplexity (first 8192 tokens, ctx 512,
second half scored) and KL vs edgeq's numpy runtime (float64) on the artifact's own dequantized
weights (first 2048 tokens). Speed: tools/bench_onnx.py's method (fresh process per artifact,
A B A B rounds, 128 greedy tokens, 128-token prefill, peak RSS).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import bench_onnx  # noqa: E402

MODEL = bench_onnx.MODEL


def build(out: Path) -> Path:
    path = out / "tvm-int4"
    if not (path / "manifest.json").exists():
        bench_onnx.log("building tvm-int4")
        subprocess.run([sys.executable, "-m", "edgeq.cli", "build", str(MODEL), "--target", "cpu-avx2", "--format",
                        "tvm", "--bits", "4", "-o", str(path), "--force"], check=True, cwd=REPO)
    return path


def quality(path: Path, ppl_tokens: int, kl_tokens: int, threads: int) -> dict:
    from edgeq.artifact import read_manifest
    from edgeq.evaluate import evaluate_wikitext, wikitext2_test_text
    from edgeq.frontend import load_model
    from edgeq.backends.tvm.lower import TvmOptions, lowered_ir
    from edgeq.session import open_session
    from runtimes.reference import ReferenceSession

    info = read_manifest(path)["tvm"]
    opts = TvmOptions(bits=info["bits"], group=info["group"], lr_dtype=info.get("lr_dtype", "float32"),
                      target=info["target"])
    own = ReferenceSession(lowered_ir(load_model(MODEL), opts), n_ctx=600, dtype=np.float64)
    s = open_session(path, n_ctx=600, threads=threads)
    tokens = list(s.tokenize(wikitext2_test_text(), add_special=False))
    ppl = evaluate_wikitext(s, None, tokens=tokens, max_tokens=ppl_tokens).perplexity
    kl = evaluate_wikitext(s, own, tokens=tokens, max_tokens=kl_tokens).kl
    ids = tokens[:256]
    return {"ppl": ppl.ppl, "ppl_scored": ppl.scored_tokens, "kl_vs_own_weights": kl.mean_kl,
            "top1_vs_own_weights": kl.top1_agreement, "kl_scored": kl.count,
            "max_abs_logit_diff_256": float(np.abs(s.logits(ids) - own.logits(ids)).max())}


def main() -> None:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--kl-tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=["all", "quality", "speed"], default="all")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-tvm")
    ap.add_argument("--onnx-out", type=Path, default=REPO / "out" / "bench-onnx")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: SmolLM2)")
    a = ap.parse_args()
    if a.model is not None:
        MODEL = bench_onnx.MODEL = a.model.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    arts = {"tvm-int4": build(a.out)}
    arts.update({k: v for k, v in bench_onnx.build_all([4], a.onnx_out).items()})
    res_path = a.out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    res["sizes_mb"] = {n: sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".gguf", ".onnx", ".data", ".so",
                                                                                   ".safetensors")) / 1e6
                       for n, p in arts.items()}
    if a.stage in ("all", "quality"):
        res["quality"] = {"tvm-int4": quality(arts["tvm-int4"], a.ppl_tokens, a.kl_tokens, a.threads)}
    if a.stage in ("all", "speed"):
        res["speed"] = bench_onnx.speed(arts, a.runs, a.rounds, a.threads)
    res["command"] = " ".join(sys.argv)
    res_path.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(bench_onnx.table(res))


if __name__ == "__main__":
    main()

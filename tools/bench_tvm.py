"""Issue 6 end-to-end benchmark: the TVM artifact (generated kernels + numpy decoder) vs llama.cpp
at the same bits, SmolLM2-135M-Instruct on cpu-avx2.

    .venv/bin/python tools/bench_tvm.py [--stage quality|speed|all] [--runs 5] [--rounds 2] [--threads 2]
        [--model DIR] [--out out/bench-tvm] [--onnx-out out/bench-onnx] [--numpy-decoder]

Artifacts (built if missing): ``tvm-int4`` = ``edgeq build --format tvm --bits 4`` (int4 group 32
symmetric, head int8) in out/bench-tvm, next to ``gguf-Q4_0`` / ``onnx-int4`` of
tools/bench_onnx.py (``--onnx-out``, default out/bench-onnx; ``--model``: another checkpoint than
SmolLM2, e.g. models/cache/gemma3-270m). Quality: wikitext-2 perplexity (first 8192 tokens, ctx 512,
second half scored) and KL vs edgeq's numpy runtime (float64) on the artifact's own dequantized
weights (first 2048 tokens). Speed: tools/bench_onnx.py's method (fresh process per artifact,
A B A B rounds, 128 greedy tokens, 128-token prefill, peak RSS). ``--stage interleaved``: decode
only, every artifact in one process, one 128-token run of each per round, ratios to llama.cpp per
round (for a loaded machine whose speed drifts between processes). ``--numpy-decoder``: also
``tvm-int4-numpy-decoder``, a copy of ``tvm-int4`` whose manifest lists no compiled decoder
(``tvm.decoder`` removed), so the runtime runs the numpy decoder around the same kernels — the TVM
artifact as it was before issue 16's compiled decoder, timed in the same rounds.
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


def numpy_decoder_copy(path: Path, out: Path) -> Path:
    """A copy of the artifact at ``path`` whose manifest lists no compiled decoder (its library and
    weights unchanged): the runtime runs the numpy decoder around the same kernels."""
    import shutil

    from edgeq.artifact import read_manifest, write_manifest

    dst = out / "tvm-int4-numpy-decoder"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(path, dst)
    m = read_manifest(dst)
    m["tvm"].pop("decoder", None)
    write_manifest(dst, m)
    return dst


def interleaved(arts: dict[str, Path], rounds: int, threads: int, max_tokens: int = 128) -> dict:
    """Decode tok/s of every artifact opened in one process, one ``max_tokens`` greedy run of each
    per round (the order rotated every round): on a machine whose load drifts, runs seconds apart
    are comparable where separate processes minutes apart are not. Per round each artifact's
    ratio to the first artifact is kept; the result is the median over rounds."""
    import statistics

    from edgeq.profile import DECODE_PROMPT
    from edgeq.session import open_session

    names = list(arts)
    sessions = {n: open_session(arts[n], n_ctx=512, threads=threads) for n in names}
    prompts = {n: s.tokenize(DECODE_PROMPT) for n, s in sessions.items()}

    def run(n):
        list(sessions[n].generate_ids(prompts[n], max_tokens, stop_at_eos=False))
        return sessions[n].last_stats.decode_tok_s

    for n in names:  # warm-up
        run(n)
    tok_s: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        bench_onnx.log(f"interleaved round {r + 1}/{rounds}")
        for n in names[r % len(names):] + names[:r % len(names)]:
            tok_s[n].append(run(n))
    base = names[0]
    return {n: {"decode_tok_s": statistics.median(v), "decode_tok_s_by_round": v,
                f"ratio_to_{base}": statistics.median(x / y for x, y in zip(v, tok_s[base]))}
            for n, v in tok_s.items()}


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
    ap.add_argument("--stage", choices=["all", "quality", "speed", "interleaved"], default="all",
                    help="interleaved: every artifact in one process, one decode run each per round (--rounds)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-tvm")
    ap.add_argument("--onnx-out", type=Path, default=REPO / "out" / "bench-onnx")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: SmolLM2)")
    ap.add_argument("--numpy-decoder", action="store_true",
                    help="also time tvm-int4 with the numpy decoder (the runtime before the compiled decoder)")
    a = ap.parse_args()
    if a.model is not None:
        MODEL = bench_onnx.MODEL = a.model.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    arts = {"tvm-int4": build(a.out)}
    if a.numpy_decoder:
        arts["tvm-int4-numpy-decoder"] = numpy_decoder_copy(arts["tvm-int4"], a.out)
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
    if a.stage == "interleaved":
        order = ["gguf-Q4_0"] + [n for n in arts if n != "gguf-Q4_0"]  # ratios to llama.cpp
        res["interleaved"] = interleaved({n: arts[n] for n in order if n in arts}, a.rounds, a.threads)
        for n, v in res["interleaved"].items():
            print(f"{n:24s} decode {v['decode_tok_s']:6.1f} tok/s  x{v['ratio_to_gguf-Q4_0']:.2f} of llama.cpp  "
                  f"rounds {' '.join(f'{x:.0f}' for x in v['decode_tok_s_by_round'])}")
    res["command"] = " ".join(sys.argv)
    res_path.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    if a.stage != "interleaved":
        print(bench_onnx.table(res))


if __name__ == "__main__":
    main()

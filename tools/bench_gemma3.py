"""Issue 17 benchmark: Gemma 3 270M through edgeq's GGUF lowering vs llama.cpp's own quantizer.

    .venv/bin/python tools/bench_gemma3.py [--model models/cache/gemma3-270m] [--out out/bench-gemma3]
                                           [--ppl-tokens 4096] [--threads 2]

Writes edgeq's F32 / Q8_0 / Q4_0 GGUFs of the materialised checkpoint (``write_gguf`` with the
``--bits`` type plan, as ``edgeq build --bits N`` lowers), quantizes edgeq's F32 file with
``llama_cpp.llama_model_quantize`` (ftype Q8_0 / Q4_0, no imatrix), and compares the files tensor
by tensor (type, shape, bytes), listing every tensor whose type or bytes differ. With
``--ppl-tokens N > 0`` it also scores wikitext-2 test by the protocol of
../shared/design/BENCHMARK_PROTOCOL.md (ctx 512, second half of each window) on the first N
tokens with llama.cpp, for each file. Prints JSON (also written to OUT/results.json).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeq.backends.gguf.lower import tensor_types, write_gguf  # noqa: E402
from edgeq.frontend import load_model  # noqa: E402
from llamacpp_quantize import compare_gguf, llamacpp_quantize  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def perplexity_of(path: Path, text: str, max_tokens: int, threads: int) -> dict:
    from edgeq.evaluate import perplexity
    from runtimes.llamacpp import LlamaCppSession

    with LlamaCppSession(path, n_ctx=512, n_threads=threads) as s:
        toks = s.tokenize(text, add_special=False)
        t = time.process_time()
        p = perplexity(s, toks, ctx=512, max_tokens=max_tokens)
        return {"ppl": p.ppl, "scored_tokens": p.scored_tokens, "cpu_s": time.process_time() - t}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "cache" / "gemma3-270m")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-gemma3")
    ap.add_argument("--ppl-tokens", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not (args.model / "config.json").exists():
        from models.gemma3 import materialise_gemma3

        materialise_gemma3(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    ir = load_model(args.model)
    files: dict[str, Path] = {}
    res: dict = {"model": str(args.model), "cpu_s": {}, "compare": {}, "types": {}}
    for q, bits in (("F32", 32), ("Q8_0", 8), ("Q4_0", 4)):
        log(f"edgeq {q}")
        t = time.process_time()
        types = tensor_types(ir, bits)
        files[f"edgeq {q}"] = write_gguf(ir, args.out / f"edgeq-{q}.gguf", types)
        res["cpu_s"][f"edgeq {q}"] = time.process_time() - t
        res["types"][q] = {"token_embd": types["token_embd"].value, "linears": types["blk.0.attn_q"].value}
    for q in ("Q8_0", "Q4_0"):
        log(f"llama_model_quantize {q}")
        dst = args.out / f"llamacpp-{q}.gguf"
        res["cpu_s"][f"llama.cpp {q}"] = llamacpp_quantize(files["edgeq F32"], dst, q, args.threads,
                                                         clock=time.process_time)
        files[f"llama.cpp {q}"] = dst
        res["compare"][q] = compare_gguf(files[f"edgeq {q}"], dst)
        log(f"  {q}: {res['compare'][q]['identical_tensors']}/{res['compare'][q]['tensors']} identical")
    if args.ppl_tokens > 0:
        from edgeq.evaluate import wikitext2_test_text

        text = wikitext2_test_text()
        res["ppl"] = {}
        for name, path in files.items():
            res["ppl"][name] = perplexity_of(path, text, args.ppl_tokens, args.threads)
            log(f"  {name}: ppl {res['ppl'][name]['ppl']:.4f}")
    res["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

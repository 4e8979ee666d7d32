"""Issue 16 item 2, end to end: SmolLM2-135M-Instruct ``--format tvm --bits 4`` for a CPU profile
(``--profile``: cpu-avx512, VNNI; cpu-avx2, AVX2's vpmaddubsw) with float32-activation kernels vs
int8-activation kernels (``[deploy] tvm_activations``).

    .venv/bin/python tools/bench_tvm_int8.py [--profile cpu-avx512] [--stage quality|speed|all]
        [--runs 5] [--rounds 2] [--threads 2] [--ppl-tokens 8192] [--kl-tokens 2048]
        [--out out/bench-tvm-int8 (cpu-avx2: out/bench-tvm-int8-avx2)]

Both artifacts are built from copies of targets/<profile>.toml with the field set explicitly
(so the comparison does not depend on what the shipped profile chooses). Quality: wikitext-2
perplexity of each, KL(float-act artifact ‖ int8-act artifact) — what the int8 activations cost —
and each one's ``edgeq verify`` verdict (the reference check against the fp32 model, with the
format's bounds). Speed: a fresh process per artifact, A B A B rounds; per run a 128-token
prefill then 128 greedy decode steps, each timed by the wall clock and by the process's CPU time
(user + sys: with ``--threads 1`` the measure that other load on a shared machine does not
inflate; with more threads TVM's pool spins, so CPU time overstates work). Medians over runs and
rounds; peak RSS. Writes OUT/results.json (``speed_t<threads>``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import bench_onnx  # noqa: E402

ACTS = {"tvm-f32act": "float32", "tvm-int8act": "int8"}


def profile_copy(out: Path, act: str, profile: str = "cpu-avx512") -> Path:
    name = f"{profile}-{act}"
    src = (REPO / "targets" / f"{profile}.toml").read_text()
    lines = [ln for ln in src.splitlines() if not ln.startswith("tvm_activations")]
    text = "\n".join(lines).replace(f'name = "{profile}"', f'name = "{name}"')
    text = text.replace("\n[deploy]\n", f'\n[deploy]\ntvm_activations = "{act}"\n')
    path = out / f"{name}.toml"
    path.write_text(text + "\n")
    return path


def build(out: Path, profile: str = "cpu-avx512") -> dict[str, Path]:
    arts = {}
    for name, act in ACTS.items():
        path = out / name
        if not (path / "manifest.json").exists():
            bench_onnx.log(f"building {name}")
            subprocess.run([sys.executable, "-m", "edgeq.cli", "build", str(bench_onnx.MODEL), "--target",
                            str(profile_copy(out, act, profile)), "--format", "tvm", "--bits", "4", "-o", str(path),
                            "--force"], check=True, cwd=REPO)
        arts[name] = path
    return arts


def quality(arts: dict[str, Path], ppl_tokens: int, kl_tokens: int, threads: int) -> dict:
    from edgeq.evaluate import evaluate_wikitext, wikitext2_test_text
    from edgeq.session import open_session

    f, q = (open_session(arts[n], n_ctx=600, threads=threads) for n in ACTS)
    tokens = list(f.tokenize(wikitext2_test_text(), add_special=False))
    res = {}
    for name, s in zip(ACTS, (f, q)):
        ppl = evaluate_wikitext(s, None, tokens=tokens, max_tokens=ppl_tokens).perplexity
        v = subprocess.run([sys.executable, "-m", "edgeq.cli", "verify", str(arts[name])], capture_output=True,
                           text=True, cwd=REPO)
        res[name] = {"ppl": ppl.ppl, "ppl_scored": ppl.scored_tokens, "verify_rc": v.returncode,
                     "verify": [ln for ln in v.stdout.splitlines() if "reference" in ln.lower() or "OK" in ln]}
    kl = evaluate_wikitext(q, f, tokens=tokens, max_tokens=kl_tokens).kl
    res["tvm-int8act"].update({"kl_vs_f32act": kl.mean_kl, "top1_vs_f32act": kl.top1_agreement,
                               "kl_scored": kl.count})
    return res


SPEED_CODE = """
import json, sys, time
sys.path.insert(0, {repo!r})
from edgeq.profile import prompt_of_length, peak_rss_bytes
from edgeq.session import open_session
s = open_session({path!r}, n_ctx=512, threads={threads})
p = prompt_of_length(s, 128)
out = []
for run in range({runs} + 1):
    s.reset()
    w, c = time.perf_counter(), time.process_time()
    last = s._start(p)
    w1, c1 = time.perf_counter(), time.process_time()
    tok = int(last.argmax())
    for _ in range(128):
        tok = int(s._step(tok).argmax())
    w2, c2 = time.perf_counter(), time.process_time()
    if run:  # run 0 warms up
        out.append({{"prefill_wall": w1 - w, "prefill_cpu": c1 - c, "decode_wall": (w2 - w1) / 128,
                     "decode_cpu": (c2 - c1) / 128}})
print(json.dumps({{"runs": out, "peak_rss_bytes": peak_rss_bytes()}}))
"""


def speed(arts: dict[str, Path], runs: int, rounds: int, threads: int) -> dict:
    got: dict[str, list] = {n: [] for n in arts}
    rss: dict[str, list] = {n: [] for n in arts}
    for r in range(rounds):
        for name, path in arts.items():
            bench_onnx.log(f"speed round {r + 1}/{rounds}: {name} ({threads} threads)")
            code = SPEED_CODE.format(repo=str(REPO), path=str(path), threads=threads, runs=runs)
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                               env={**os.environ, "TQDM_DISABLE": "1"})
            if p.returncode:
                raise RuntimeError(p.stderr[-2000:])
            d = json.loads(p.stdout.strip().splitlines()[-1])
            got[name] += d["runs"]
            rss[name].append(d["peak_rss_bytes"])
    res = {}
    for name, rs in got.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        res[name] = {"decode_ms_wall": med["decode_wall"] * 1e3, "decode_ms_cpu": med["decode_cpu"] * 1e3,
                     "decode_tok_s_wall": 1 / med["decode_wall"], "prefill_128_ms_wall": med["prefill_wall"] * 1e3,
                     "prefill_128_ms_cpu": med["prefill_cpu"] * 1e3, "prefill_128_tok_s_wall": 128 / med["prefill_wall"],
                     "peak_rss_mb": statistics.median(rss[name]) / 1e6, "samples": len(rs), "threads": threads}
    return res


def table(res: dict) -> str:
    q = res.get("quality", {})
    f = lambda d, k, fmt: format(d[k], fmt) if k in d else "-"  # noqa: E731
    lines = ["| artifact | ppl | KL vs f32-act artifact | top-1 | verify |", "|---|---|---|---|---|"]
    for n in ACTS:
        qq = q.get(n, {})
        ver = "-" if "verify_rc" not in qq else ("OK" if qq["verify_rc"] == 0 else "FAIL")
        lines.append(f"| {n} | {f(qq, 'ppl', '.3f')} | {f(qq, 'kl_vs_f32act', '.2e')} | "
                     f"{f(qq, 'top1_vs_f32act', '.4f')} | {ver} |")
    for key in sorted(k for k in res if k.startswith("speed_t")):
        s = res[key]
        lines += ["", f"{key}: | artifact | decode ms/token CPU | wall | decode tok/s wall | prefill 128 ms CPU | "
                      "wall | peak RSS MB |", "|---|---|---|---|---|---|---|"]
        for n in ACTS:
            ss = s.get(n, {})
            lines.append(f"| {n} | {f(ss, 'decode_ms_cpu', '.2f')} | {f(ss, 'decode_ms_wall', '.2f')} | "
                         f"{f(ss, 'decode_tok_s_wall', '.1f')} | {f(ss, 'prefill_128_ms_cpu', '.0f')} | "
                         f"{f(ss, 'prefill_128_ms_wall', '.0f')} | {f(ss, 'peak_rss_mb', '.0f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--kl-tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=["all", "quality", "speed"], default="all")
    ap.add_argument("--profile", default="cpu-avx512", choices=["cpu-avx512", "cpu-avx2"])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.out is None:
        a.out = REPO / "out" / ("bench-tvm-int8" + ("-avx2" if a.profile == "cpu-avx2" else ""))
    a.out.mkdir(parents=True, exist_ok=True)
    arts = build(a.out, a.profile)
    res_path = a.out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    if a.stage in ("all", "quality"):
        res["quality"] = quality(arts, a.ppl_tokens, a.kl_tokens, a.threads)
    if a.stage in ("all", "speed"):
        res[f"speed_t{a.threads}"] = speed(arts, a.runs, a.rounds, a.threads)
    res["command"] = " ".join(sys.argv)
    res_path.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print(table(res))


if __name__ == "__main__":
    main()

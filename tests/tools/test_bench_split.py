"""tools/bench_split.py: one layer's linears as tasks, sequential vs a local Ray of 2 CPUs — the same
results (digest), the covariance shared by q/k/v and gate/up shipped once, the bytes accounted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_split.py"


def run(model: Path, out: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_USAGE_STATS_ENABLED": "0"}
    r = subprocess.run([sys.executable, str(TOOL), "--model", str(model), "--qtype", "Q4_0", "--rank", "8",
                        "--tokens", "64", "--json", str(out), *args], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def test_sequential_and_ray_give_the_same_results_and_account_the_bytes(tiny_llama, tmp_path):
    seq = run(tiny_llama, tmp_path / "seq.json", "--mode", "sequential")
    ray = run(tiny_llama, tmp_path / "ray.json", "--mode", "ray", "--workers", "2")
    assert seq["digest"] == ray["digest"]
    assert ray["nodes"] == 1 and len(ray["tasks"]) == len(seq["tasks"]) == 7
    shared = {t["linear"].split(".")[-1] for t in ray["tasks"] if t["cov_shared_shipped"]}
    assert len(shared) == 3 and shared <= {"attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"}
    t = ray["tasks"]
    assert ray["shipped_in_bytes"] == sum(x["weight_bytes"] + (0 if x["cov_shared_shipped"] else x["cov_bytes"])
                                          for x in t)
    for x in t:
        R, K = x["shape"]
        assert x["weight_bytes"] == 4 * R * K and x["cov_bytes"] == 8 * K * K
        assert x["out_bytes"] > 4 * R * K  # (dequantized float32 + packed + rank-8 factors)
    assert ray["tasks_cpu_s"] > 0 and ray["gflops"] == seq["gflops"]

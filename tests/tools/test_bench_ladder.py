"""tools/bench_ladder.py (issue 15): the carried rates beside llama.cpp's quantization ladder — the
equal-speed interpolation, and one small run end to end on the tiny model whose numbers must
order the way quantization and pruning do (more bits: less KL; a higher rate: more KL)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_ladder.py"
sys.path.insert(0, str(REPO / "tools"))

from bench_ladder import ladder_kl_at  # noqa: E402


def test_ladder_kl_at_interpolates_between_the_bracketing_points():
    ladder = [(100.0, 0.01), (150.0, 0.05), (120.0, 0.02)]  # (tok/s, KL), any order
    assert ladder_kl_at(100.0, ladder) == pytest.approx(0.01)
    assert ladder_kl_at(110.0, ladder) == pytest.approx(0.015)
    assert ladder_kl_at(135.0, ladder) == pytest.approx(0.035)
    assert ladder_kl_at(150.0, ladder) == pytest.approx(0.05)
    assert ladder_kl_at(99.9, ladder) is None and ladder_kl_at(150.1, ladder) is None
    assert ladder_kl_at(5.0, []) is None


def test_a_small_run_orders_its_points(tiny_llama, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(TOOL), "--model", str(tiny_llama), "--types", "Q8_0,Q4_0",
                        "--formats", "gguf,onnx", "--rates", "0,0.25",
                        "--edgeq-args", "--bits 8 --prune-dims mlp --calib-samples 4 --calib-len 64",
                        "--ppl-tokens", "512", "--decode-runs", "1", "--decode-tokens", "8", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    by = {(x["who"], x["point"]): x for x in res["rows"]}
    assert set(by) == {("llama.cpp", "Q8_0"), ("llama.cpp", "Q4_0"), ("edgeq", "gguf rate 0"),
                       ("edgeq", "gguf rate 0.25"), ("edgeq", "onnx rate 0"), ("edgeq", "onnx rate 0.25")}
    for x in res["rows"]:
        assert x["kl"] >= 0 and 0 < x["top1"] <= 1 and x["decode_tok_s"] > 0 and x["bytes"] > 0
        assert x["scored"] == res["rows"][0]["scored"] > 0  # the same positions for every point
    assert by["llama.cpp", "Q8_0"]["kl"] < by["llama.cpp", "Q4_0"]["kl"]
    for fmt in ("gguf", "onnx"):
        assert by["edgeq", f"{fmt} rate 0"]["kl"] < by["edgeq", f"{fmt} rate 0.25"]["kl"]
    assert by["edgeq", "gguf rate 0.25"]["bytes"] < by["edgeq", "gguf rate 0"]["bytes"]  # its own, smaller file
    assert "| llama.cpp Q8_0 |" in r.stdout and (out / "ladder.svg").read_text().lstrip().startswith("<?xml")

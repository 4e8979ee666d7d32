"""tools/bench_release.py: a release matrix and its single builds run one after the other, timed,
every matrix artifact compared byte for byte with its single build."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_release.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(TOOL), *args], env=env, capture_output=True, text=True, timeout=900)


def test_matrix_and_singles_are_timed_and_byte_identical(tiny_llama, tmp_path):
    out = tmp_path / "result.json"
    r = run("--model", str(tiny_llama), "--work", str(tmp_path / "w"), "--targets", "cpu-avx2,gpu-t4",
            "--json", str(out), "--", "--prune-rates", "0,0.25", "--calib-samples", "2", "--calib-len", "16")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["byte_identical"] == {"cpu-avx2": True, "gpu-t4": True}
    runs = res["runs"]
    assert set(runs) == {"matrix", "cpu-avx2", "gpu-t4"}
    assert all(v["wall_s"] > 0 and v["cpu_s"] > 0 and v["max_rss_mib"] > 50 for v in runs.values())
    assert res["sum_singles_wall_s"] == round(runs["cpu-avx2"]["wall_s"] + runs["gpu-t4"]["wall_s"], 1)
    assert {s["step"] for s in res["shared_steps"]} >= {"load", "calibrate"}
    # the matrix ran each shared step once for both targets, the singles once each (counted in the
    # build logs: its CPU saving on a model this small, ~0.7 s of ~3 s, is within a loaded host's
    # noise — CI once measured 1.026x — so the ratio is reported, not asserted: a benchmark number)
    logs = {n: (tmp_path / "w" / f"{n}.log").read_text() for n in ("matrix", "single-cpu-avx2", "single-gpu-t4")}
    for step in ("load", "calibrate", "sort"):
        lines = [ln for ln in logs["matrix"].splitlines() if f"step {step} (v" in ln]
        assert len(lines) == 1 and lines[0].endswith("once for 2 targets"), (step, lines)
        assert all(logs[s].count(f"step {step} (v") == 1 for s in ("single-cpu-avx2", "single-gpu-t4")), step
    assert res["matrix_over_singles_cpu"] > 0


def test_a_failing_build_is_one_error_line(tmp_path):
    r = run("--model", str(tmp_path / "missing"), "--work", str(tmp_path / "w"), "--targets", "cpu-avx2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_a_bad_target_list_is_one_error_line(tmp_path):
    r = run("--model", str(tmp_path), "--work", str(tmp_path / "w"), "--targets", "cpu-avx2,cpu-avx2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and "listed twice" in r.stderr

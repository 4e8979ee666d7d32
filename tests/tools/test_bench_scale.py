"""tools/bench_scale.py: the child-process measurements (wall, ru_maxrss, anon vs file-backed)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_scale", REPO / "tools" / "bench_scale.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

MB = 1e6
# Allocates and touches ANON MB of its own memory, maps and reads FILE MB of a file, holds both
# for ~1.5 s (several 0.2 s samples, even on a loaded machine), exits.
CHILD = """
import mmap, sys, time
anon, path = int(sys.argv[1]), sys.argv[2]
buf = bytearray(anon * 1000000)
for i in range(0, len(buf), 4096):
    buf[i] = 1
with open(path, "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    s = sum(m[i] for i in range(0, len(m), 4096))
    time.sleep(1.5)
"""


@pytest.fixture(scope="module")
def blob(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("blob") / "blob.bin"
    with open(p, "wb") as f:
        f.write(os.urandom(1 << 20) * 120)  # 126 MB
    return p


def test_measure_splits_anonymous_and_file_backed_memory(tmp_path, blob):
    r = bench.measure("child", [sys.executable, "-c", CHILD, "200", str(blob)], dict(os.environ),
                      tmp_path / "child.log")
    assert r["rc"] == 0 and r["samples"] >= 3 and 1.5 < r["wall_s"] < 60
    assert 200 <= r["max_vmhwm_mb"] < 500
    # ru_maxrss also counts the forking process's image (pytest's), so it only bounds from below
    assert r["ru_maxrss_mb"] >= max(r["max_vmhwm_mb"], 0.9 * r["parent_rss_mb"])
    assert 190 <= r["peak_anon_mb"] < 300
    assert 110 <= r["peak_file_mb"] < 200  # the mapped file, plus the interpreter's own mapped libraries
    assert r["peak_tree_rss_mb"] >= r["peak_anon_mb"] + 100


def test_watchdog_cap_kills_over_the_limit(tmp_path, blob):
    cap = bench.MemCap(int(100 * MB), "watchdog")
    r = bench.measure("capped", [sys.executable, "-c", CHILD, "400", str(blob)], dict(os.environ),
                      tmp_path / "capped.log", cap)
    assert r["rc"] == -9 and r["killed"].startswith("watchdog") and r["mem_limit_method"] == "watchdog"
    ok = bench.measure("under", [sys.executable, "-c", CHILD, "20", str(blob)], dict(os.environ),
                       tmp_path / "under.log", bench.MemCap(int(300 * MB), "watchdog"))
    assert ok["rc"] == 0 and "killed" not in ok  # file-backed pages do not count against the cap


def test_edgeq_side_end_to_end_on_a_small_shape(tmp_path, capsys):
    rc = bench.main(["--shape", "test-tiny", "--tokenizer", "tiny", "--work", str(tmp_path), "--skip-llamacpp",
                     "--formats", "gguf"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    (run,) = res["runs"]
    assert run["step"] == "edgeq build --bits 4 --format gguf" and run["rc"] == 0
    assert run["output_mb"] > 0 and run["ru_maxrss_mb"] > 50
    assert (tmp_path / "out" / "edgeq-gguf" / "manifest.json").exists()
    table = capsys.readouterr().out
    assert "| edgeq build --bits 4 --format gguf |" in table

"""tools/bench_compensate.py: both whitenings reach the same optimum on a small case."""
import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_compensate.py"


def test_both_whitenings_leave_the_same_error():
    spec = importlib.util.spec_from_file_location("bench_compensate", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run(48, 96, 8, ["cholesky", "eigh"])
    assert set(res) == {"cholesky", "eigh"}
    assert res["cholesky"][1] == pytest.approx(res["eigh"][1], rel=1e-3)
    assert all(t >= 0 for t, _ in res.values())

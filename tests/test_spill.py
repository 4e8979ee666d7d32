"""edgeq.spill: a build whose pass outputs and statistics are parked on disk writes the same
artifact bytes as one that keeps them in memory (pruned and planned builds)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edgeq import spill
from edgeq.build import BuildOptions, build
from edgeq.lazy import LazyTensor


def _digests(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())
            if p.is_file() and p.name != "manifest.json"}


def test_spill_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((600, 500)).astype(np.float32)
    s = rng.standard_normal((400, 400))
    assert spill.spill(a) is a  # no active store: unchanged
    with spill.spilling(tmp_path) as store:
        t = spill.spill(a)
        st = spill.spill_array(s)
        assert isinstance(t, LazyTensor) and store.count == 2
        np.testing.assert_array_equal(np.asarray(t), a)
        np.testing.assert_array_equal(st, s)
        assert not isinstance(st, np.ndarray) and np.asarray(st).dtype == np.float64  # read on use
        small = np.ones((2, 2), np.float32)
        assert spill.spill(small) is small  # under MIN_SPILL_BYTES
        root = store.root
        assert root.is_dir()
    assert not root.exists()  # removed with the block


@pytest.mark.parametrize("extra", [["--bits", "8", "--prune-rates", "0,0.25"], []], ids=["pruned", "planned"])
def test_spilled_build_is_byte_identical(tiny_llama, tmp_path, monkeypatch, extra):
    from click.testing import CliRunner

    from edgeq.cli import main

    args = [str(tiny_llama), *extra, "--calib-samples", "4", "--calib-len", "32"]
    r = CliRunner().invoke(main, ["build", *args, "-o", str(tmp_path / "memory")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    puts = []
    orig_put, orig_arr = spill.SpillStore.put, spill.SpillStore.put_array
    monkeypatch.setattr(spill, "MIN_SPILL_BYTES", 0)
    monkeypatch.setattr(spill.SpillStore, "put", lambda self, a: puts.append("w") or orig_put(self, a))
    monkeypatch.setattr(spill.SpillStore, "put_array", lambda self, a: puts.append("s") or orig_arr(self, a))
    r = CliRunner().invoke(main, ["build", *args, "-o", str(tmp_path / "spilled")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "s" in puts  # statistics were parked
    if extra:
        assert "w" in puts  # sorted weights were parked
    assert _digests(tmp_path / "memory") == _digests(tmp_path / "spilled")
    assert not list(tmp_path.glob(".edgeq-spill.*"))  # nothing left behind

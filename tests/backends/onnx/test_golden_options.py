"""How goldens run a big ONNX artifact: onnxruntime without its weight prepacking
(``golden_options``), measured in fresh processes, and ``verify`` rerunning the artifact the way
its goldens recorded it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]

_ANON_PROBE = r"""
import sys
import numpy as np
from runtimes.onnxrt import OnnxSession

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

before = anon_kb()
s = OnnxSession(sys.argv[1], n_ctx=64, threads=1, prepack=sys.argv[2] == "1")
print(anon_kb() - before)
np.save(sys.argv[3], s.logits([1, 5, 9, 30, 7, 2]))
"""


def test_prepack_off_keeps_no_private_copy_of_the_weights(tmp_path):
    """``prepack=False`` (how goldens run big ONNX artifacts): onnxruntime's prepacking costs
    anonymous memory about the size of the MatMulNBits weights, measured in fresh processes;
    without it the weights stay in the memory-mapped data file. Both compute the same model
    (int8 vs float32 activation products, so close, not equal)."""
    from edgeq.artifact import write_manifest
    from edgeq.backends.onnx import lower as lo
    from edgeq.frontend import load_model
    from models.scale import Shape, make_scale

    ckpt = make_scale(tmp_path / "ckpt", Shape(1024, 2, 4096, 16, 4, 64, 1024, True), tokenizer="tiny")
    ir = load_model(ckpt)
    art = tmp_path / "a"
    art.mkdir()
    info = lo.write_onnx(ir, art, lo.OnnxOptions())
    write_manifest(art, {"format": "onnx", "onnx": info, "hparams": ir.hparams.to_json()})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    grow, logits = {}, {}
    for flag in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", _ANON_PROBE, str(art), flag, str(tmp_path / f"l{flag}.npy")],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        grow[flag] = int(out.stdout.split()[-1]) * 1024
        logits[flag] = np.load(tmp_path / f"l{flag}.npy")
    weights = (art / lo.DATA_FILE).stat().st_size
    assert grow["1"] - grow["0"] > 0.5 * weights, (grow, weights)
    a, b = logits["1"], logits["0"]
    assert np.array_equal(np.argmax(a, -1), np.argmax(b, -1))
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))


def _build_and_verify(tmp_path, monkeypatch, threshold):
    from click.testing import CliRunner

    import runtimes.onnxrt as rt
    from edgeq.backends.onnx import backend
    from edgeq.cli import main
    from models.tiny import make_tiny_llama

    monkeypatch.setattr(backend, "GOLDENS_PREPACK_MAX_BYTES", threshold)
    seen = []
    init = rt.OnnxSession.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("prepack", True))
        init(self, *a, **kw)

    monkeypatch.setattr(rt.OnnxSession, "__init__", spy)
    model = make_tiny_llama(tmp_path / "m", seed=0)
    art = tmp_path / "a"
    for args in (["build", model, "--bits", "4", "--format", "onnx", "-o", art], ["verify", art]):
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    return json.loads((art / "manifest.json").read_text())["goldens"], seen


def test_goldens_of_a_big_onnx_run_without_prepacking_and_verify_does_the_same(tmp_path, monkeypatch):
    g, seen = _build_and_verify(tmp_path, monkeypatch, threshold=0)  # every data file counts as big
    assert g["session_options"] == {"prepack": False}
    assert seen == [False, False]  # the build's goldens, then verify's rerun


def test_goldens_of_a_small_onnx_run_as_a_device_does(tmp_path, monkeypatch):
    from edgeq.backends.onnx.backend import GOLDENS_PREPACK_MAX_BYTES

    g, seen = _build_and_verify(tmp_path, monkeypatch, threshold=GOLDENS_PREPACK_MAX_BYTES)
    assert "session_options" not in g
    assert seen == [True, True]


def test_unknown_session_options_are_one_error_line(tmp_path):
    import pytest

    from edgeq.backends.onnx.backend import OnnxBackend
    from edgeq.errors import EdgeqError

    with pytest.raises(EdgeqError, match="unknown onnxruntime session options") as ei:
        OnnxBackend().open_session(tmp_path, {"format": "onnx"}, "auto", 64, 1, 0.0, options={"repack": False})
    assert "\n" not in str(ei.value)

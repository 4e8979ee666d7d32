"""How goldens run a big ONNX artifact: onnxruntime without its weight prepacking
(``golden_options``), measured in fresh processes, and ``verify`` rerunning the artifact the way
its goldens recorded it."""
from __future__ import annotations

import numpy as np

from golden_options import ANON_KB, anon_growth, build_and_verify

_ANON_PROBE = ANON_KB + r"""
import numpy as np
from runtimes.onnxrt import OnnxSession

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
    grow, logits = {}, {}
    for flag in ("1", "0"):
        grow[flag] = anon_growth(_ANON_PROBE, art, flag, tmp_path / f"l{flag}.npy", timeout=300)
        logits[flag] = np.load(tmp_path / f"l{flag}.npy")
    weights = (art / lo.DATA_FILE).stat().st_size
    assert grow["1"] - grow["0"] > 0.5 * weights, (grow, weights)
    a, b = logits["1"], logits["0"]
    assert np.array_equal(np.argmax(a, -1), np.argmax(b, -1))
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))


def _build_and_verify(tmp_path, monkeypatch, threshold):
    import runtimes.onnxrt as rt
    from edgeq.backends.onnx import backend

    return build_and_verify(tmp_path, monkeypatch, threshold, backend=backend, limit="GOLDENS_PREPACK_MAX_BYTES",
                            session_class=rt.OnnxSession, option="prepack",
                            build_args=["--bits", "4", "--format", "onnx"])


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

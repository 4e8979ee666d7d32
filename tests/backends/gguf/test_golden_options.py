"""How goldens run a big GGUF: llama.cpp without its CPU repack (``golden_options``), measured in
fresh processes, and ``verify`` rerunning the artifact the way its goldens recorded it."""
from __future__ import annotations

import numpy as np

from edgeq_tests_gguf_tiny import tiny_ir
from golden_options import ANON_KB, anon_growth, build_and_verify

_ANON_PROBE = ANON_KB + r"""
from runtimes.llamacpp import LlamaCppSession

before = anon_kb()
s = LlamaCppSession(sys.argv[1], n_ctx=64, repack=sys.argv[2] == "1")
print(anon_kb() - before)
s.close()
"""


def test_repack_off_keeps_no_second_copy_of_the_weights(tmp_path):
    """``repack=False`` (how goldens run big GGUFs) loads no interleaved copy of the Q4_0 weights:
    llama.cpp's CPU repack costs anonymous memory about the size of those weights, measured in
    fresh processes; and both layouts compute the same next-token distributions."""
    from edgeq.backends.gguf.lower import tensor_types, write_gguf

    ir = tiny_ir(hidden=512, heads=8, kv=4, ffn=2048, layers=2, vocab=320)
    path = write_gguf(ir, tmp_path / "q4.gguf", tensor_types(ir, 4))
    grow = {flag: anon_growth(_ANON_PROBE, path, flag, timeout=120) for flag in ("1", "0")}
    weights = path.stat().st_size
    assert grow["1"] - grow["0"] > 0.5 * weights, (grow, weights)
    ids = [1, 5, 9, 30, 7, 2]
    from runtimes.llamacpp import LlamaCppSession

    a, b = LlamaCppSession(path, n_ctx=64, repack=True), LlamaCppSession(path, n_ctx=64, repack=False)
    try:
        la, lb = a.logits(ids), b.logits(ids)
    finally:
        a.close()
        b.close()
    assert np.array_equal(np.argmax(la, -1), np.argmax(lb, -1))
    assert np.max(np.abs(la - lb)) < 0.05 * np.max(np.abs(la))


def _build_and_verify(tmp_path, monkeypatch, threshold):
    import runtimes.llamacpp as rt
    from edgeq.backends.gguf import backend

    return build_and_verify(tmp_path, monkeypatch, threshold, backend=backend, limit="GOLDENS_REPACK_MAX_BYTES",
                            session_class=rt.LlamaCppSession, option="repack", build_args=["--bits", "4"])


def test_goldens_of_a_big_gguf_run_without_repack_and_verify_does_the_same(tmp_path, monkeypatch):
    g, seen = _build_and_verify(tmp_path, monkeypatch, threshold=0)  # every file counts as big
    assert g["session_options"] == {"repack": False}
    assert seen == [False, False]  # the build's goldens, then verify's rerun


def test_goldens_of_a_small_gguf_run_as_a_device_does(tmp_path, monkeypatch):
    from edgeq.backends.gguf.backend import GOLDENS_REPACK_MAX_BYTES

    g, seen = _build_and_verify(tmp_path, monkeypatch, threshold=GOLDENS_REPACK_MAX_BYTES)
    assert "session_options" not in g
    assert seen == [True, True]

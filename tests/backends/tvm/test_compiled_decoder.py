"""The compiled decode token of a TVM artifact (runtimes/tvm_decoder.py): decode steps run entirely
in the kernel library and equal the reference runtime and the numpy decoder, at every pruning rate
(masks, active MLP widths, bias compensation switched per call list), for Llama, Qwen2 (Q|K|V bias)
and Gemma 3 (GeGLU, QK-norm, sandwich norms, embedding scale, sliding windows crossed)."""
import platform

import numpy as np
import pytest

import tvm  # noqa: F401

from edgeq.artifact import read_manifest, write_manifest  # noqa: E402
from edgeq.backends.tvm import lower as lt  # noqa: E402
from edgeq.breakdown import tvm_breakdown  # noqa: E402
from edgeq.frontend import load_model  # noqa: E402
from runtimes.reference import ReferenceSession  # noqa: E402
from runtimes.tvmrt import TvmSession  # noqa: E402
from edgeq_tests_prune_bias import RATES, biased_ir, ids_for  # noqa: E402

HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
REL = 1e-4  # float32 kernels + decoder vs the float64 reference on the same dequantized weights
PROMPT = 9

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="artifacts built for an x86 profile")


def _write(ir, out):
    out.mkdir()
    opts = lt.TvmOptions(bits=4, group=32, target=HOST)
    m = {"format": "tvm", "tvm": lt.write_tvm(ir, out, opts), "hparams": ir.hparams.to_json()}
    if ir.prune is not None:
        m["prune"] = {"rates": list(ir.prune.rates), "widths": ir.prune.to_json()["widths"]}
    write_manifest(out, m)
    return opts, m["tvm"]


def _decode(s, ids):
    """Logits of positions PROMPT - 1 .. end: a prefill, then one decode step per token."""
    s.reset()
    return np.stack([s._start(ids[:PROMPT])] + [s._step(t) for t in ids[PROMPT:]])


def _no_numpy_decoder(*_a, **_k):
    raise AssertionError("the numpy decoder ran during a compiled decode step")


@pytest.fixture(scope="module")
def biased(tiny_llama, tiny_qwen2, tmp_path_factory):
    """Pruned, sorted models with bias compensation of Q/K/V, O and MLP dims (Qwen2: Q|K|V bias)."""
    out = {}
    for name, d in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        ir = biased_ir(d, dims="all")
        root = tmp_path_factory.mktemp(name) / "a"
        opts, info = _write(ir, root)
        out[name] = (ir, opts, info, root)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decode_steps_equal_reference_and_numpy_decoder_at_every_rate(biased, family, monkeypatch):
    ir, opts, info, root = biased[family]
    assert set(info["decoder"]) == {"embed", "norm", "add_norm", "attention", "glu"}
    assert not set(info["decoder"].values()) & set(info["functions"])  # "functions": the matmul kernels
    ref = ReferenceSession(lt.lowered_ir(ir, opts), dtype=np.float64)
    s = TvmSession(root)
    monkeypatch.setenv("EDGEQ_TVM_DECODER", "numpy")
    numpy_s = TvmSession(root)
    monkeypatch.delenv("EDGEQ_TVM_DECODER")
    assert s.compiled_decoder and not numpy_s.compiled_decoder
    ids = ids_for(ir)
    outs = {}
    for r in RATES:
        for x in (s, numpy_s, ref):
            x.set_prune_rate(r)
        want = ref.logits(ids)[PROMPT - 1:]
        s._start(ids[:PROMPT])
        s._forward = _no_numpy_decoder  # the steps below must not touch it
        try:
            got = np.stack([s._step(t) for t in ids[PROMPT:]])
        finally:
            del s._forward
        outs[r] = got
        tol = REL * np.abs(want).max()
        assert np.abs(got - want[1:]).max() <= tol, r
        assert np.abs(got - _decode(numpy_s, ids)[1:]).max() <= tol, r
    assert all(np.abs(outs[r] - outs[0.0]).max() > 1e-2 for r in RATES[1:])  # the rates differ


def test_switching_rate_mid_context_follows_the_kv_policies(biased):
    """With bias compensation (o / down rows of the new rate's call list)."""
    ir, opts, _, root = biased["llama"]
    ids = ids_for(ir)
    ref = ReferenceSession(lt.lowered_ir(ir, opts), dtype=np.float64)
    s = TvmSession(root)
    for kv in ("keep", "recompute"):
        for x in (s, ref):
            x.set_prune_rate(0.0)
        got = [s._start(ids[:PROMPT])]
        want = [ref._start(ids[:PROMPT])]
        for i, t in enumerate(ids[PROMPT:PROMPT + 6]):
            if i == 3:
                for x in (s, ref):
                    x.set_prune_rate(RATES[-1], kv=kv)
            got.append(s._step(t))
            want.append(ref._step(t))
        got, want = np.stack(got), np.stack(want)
        assert np.abs(got - want).max() <= REL * np.abs(want).max(), kv


def test_breakdown_times_every_library_call(biased):
    s = TvmSession(biased["qwen2"][3])
    res = tvm_breakdown(s, 4)
    cats = res["by_category"]
    assert {"attention", "add+norm", "glu", "kernel qkv", "kernel down", "kernel head", "embed"} <= set(cats)
    assert "numpy decoder" not in cats and res["unattributed_ms"] == 0.0
    assert len(res["by_layer"]) == s.hp.num_layers
    assert sum(cats.values()) == pytest.approx(res["per_token_ms"], rel=1e-6)


@pytest.mark.parametrize("which", ["tiny_gemma3", "tiny_gemma3_scaled", "pruned_gemma3_ir"])
def test_gemma3_decode_steps_are_compiled_too(which, request, tmp_path, monkeypatch):
    """Steps across the sliding window (24 tokens, window 8), at every rate of the MLP-pruned,
    bias-compensated one: equal to the reference runtime and to the numpy decoder."""
    got = request.getfixturevalue(which)
    ir = got if which == "pruned_gemma3_ir" else load_model(got)
    hp = ir.hparams
    assert hp.qk_norm and hp.sandwich_norm and hp.hidden_act == "gelu_tanh" and hp.sliding_window < 12
    opts, info = _write(ir, tmp_path / "a")
    assert set(info["decoder"]) == {"embed", "norm", "add_norm", "post_add_norm", "attention", "glu"}
    assert info["decoder"]["glu"].startswith("dec_geglu") and info["decoder"]["attention"].endswith("_qkn")
    ref = ReferenceSession(lt.lowered_ir(ir, opts), n_ctx=64, dtype=np.float64)
    s = TvmSession(tmp_path / "a", n_ctx=64)
    monkeypatch.setenv("EDGEQ_TVM_DECODER", "numpy")
    numpy_s = TvmSession(tmp_path / "a", n_ctx=64)
    assert s.compiled_decoder and not numpy_s.compiled_decoder
    ids = [int(t) for t in np.random.default_rng(3).integers(0, hp.vocab_size, 24)]
    for r in (ir.prune.rates if ir.prune is not None else (0.0,)):
        for x in (s, numpy_s, ref):
            x.set_prune_rate(r)
        want = ref.logits(ids)[PROMPT - 1:]
        s._start(ids[:PROMPT])
        s._forward = _no_numpy_decoder
        try:
            got = np.stack([s._step(t) for t in ids[PROMPT:]])
        finally:
            del s._forward
        tol = REL * np.abs(want).max()
        assert np.abs(got - want[1:]).max() <= tol, r
        assert np.abs(got - _decode(numpy_s, ids)[1:]).max() <= tol, r


def test_no_compiled_decoder_for_other_activations(tiny_llama):
    import dataclasses

    ir = load_model(tiny_llama)
    assert lt.decoder_spec(ir, lt.TvmOptions(target=HOST)) is not None
    other = ir.replace(hparams=dataclasses.replace(ir.hparams, hidden_act="relu"))
    assert lt.decoder_spec(other, lt.TvmOptions(target=HOST)) is None


def test_cuda_artifacts_carry_the_decoder_as_gpu_kernels(tiny_llama, tmp_path):
    """A CUDA build lists the decoder in ``tvm.decoder`` and its library embeds the CUDA kernels of
    those names (edgeq.kernels.tir_decoder_cuda; checked against the CPU decoder and with nvcc in
    tests/kernels/test_tir_decoder.py). No GPU here: the artifact is not run."""
    ir = load_model(tiny_llama)
    cuda = {"kind": "cuda", "arch": "sm_86"}
    opts = lt.TvmOptions(bits=4, group=32, target=cuda)
    spec = lt.decoder_spec(ir, opts)
    assert spec is not None and not spec.dot_layout
    out = tmp_path / "a"
    out.mkdir()
    info = lt.write_tvm(ir, out, opts)
    assert info["decoder"] == spec.names()
    blob = (out / info["library"]).read_bytes()
    for name in spec.names().values():
        assert f"{name}_kernel".encode() in blob, name
    assert b"__syncthreads" in blob  # the CUDA source, not CPU code


def test_artifact_without_decoder_functions_runs_the_numpy_decoder(biased, tmp_path):
    """An artifact written before the decoder was compiled (no ``tvm.decoder``) still runs."""
    import shutil

    ir, opts, _, src = biased["qwen2"]
    old = tmp_path / "old"
    shutil.copytree(src, old)
    m = read_manifest(old)
    del m["tvm"]["decoder"]
    write_manifest(old, m)
    s = TvmSession(old)
    assert not s.compiled_decoder
    ids = ids_for(ir)
    want = ReferenceSession(lt.lowered_ir(ir, opts), dtype=np.float64).logits(ids)[PROMPT - 1:]
    assert np.abs(_decode(s, ids) - want).max() <= REL * np.abs(want).max()


def test_manifest_naming_a_missing_decoder_function_is_refused(biased, tmp_path):
    import shutil

    from edgeq.errors import EdgeqError

    bad = tmp_path / "bad"
    shutil.copytree(biased["llama"][3], bad)
    m = read_manifest(bad)
    m["tvm"]["decoder"]["attention"] = "dec_attention_nope"
    write_manifest(bad, m)
    with pytest.raises(EdgeqError, match="no decoder function"):
        TvmSession(bad)


def test_the_numpy_path_runs_with_one_blas_thread(biased, monkeypatch):
    # OpenBLAS threads spinning beside TVM's pool between kernel calls halved the prefill at 2
    # threads: the numpy path (prefill) holds numpy's BLAS to one thread, and gives it back after
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    ir, _, _, root = biased["llama"]
    s = TvmSession(root, threads=2)
    real, seen = s._forward_numpy, []

    def spy(ids):
        seen.append(blas_threads())
        return real(ids)

    monkeypatch.setattr(s, "_forward_numpy", spy)
    before = blas_threads()
    s._start(ids_for(ir)[:PROMPT])
    assert seen and set(seen[0].values()) == {1}
    assert blas_threads() == before

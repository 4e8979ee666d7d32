"""TVM lowering + runtime: logits vs the reference runtime (tiny Llama / Qwen2, sorted and pruned,
low-rank branches fused into the kernels), rate switching, tampered library, cross targets."""
import os
import platform

import numpy as np
import pytest

import tvm  # noqa: F401

from edgeq.artifact import read_manifest, write_manifest  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.frontend import load_adapter, load_model  # noqa: E402
from edgeq.backends.tvm import lower as lt  # noqa: E402
from runtimes.reference import ReferenceSession  # noqa: E402
from runtimes.tvmrt import TvmSession  # noqa: E402

RATES = (0.0, 0.15, 0.25, 0.35)
HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
REL = 1e-4  # float32 kernels + numpy vs the float64 reference on the same dequantized weights

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="artifacts built for an x86 profile")


def _pruned(model_dir, lora=None):
    from edgeq.passes.naive_sort import naive_sort
    from edgeq.passes.rate_plan import apply_prune_spec, plan_rates

    ir = load_model(model_dir)
    ir = naive_sort(load_adapter(ir, lora) if lora else ir)
    return apply_prune_spec(ir, plan_rates(ir, RATES, granularity=32, importance=np.array([0.1, 0.3])))


def _write(ir, out, bits=4):
    out.mkdir(parents=True)
    opts = lt.TvmOptions(bits=bits, group=32, target=HOST)
    info = lt.write_tvm(ir, out, opts)
    m = {"format": "tvm", "tvm": info, "hparams": ir.hparams.to_json()}
    if ir.prune is not None:
        m["prune"] = {"rates": list(ir.prune.rates), "widths": ir.prune.to_json()["widths"]}
    write_manifest(out, m)
    return opts


def _ids(ir, n=24, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, ir.hparams.vocab_size, n)]


@pytest.mark.parametrize("bits", [4, 8])
def test_logits_match_reference_runtime(tiny_model, tmp_path, bits):
    ir = load_model(tiny_model)
    opts = _write(ir, tmp_path / "a", bits)
    ids = _ids(ir)
    got = TvmSession(tmp_path / "a").logits(ids)
    want = ReferenceSession(lt.lowered_ir(ir, opts), dtype=np.float64).logits(ids)
    assert np.abs(got - want).max() <= REL * np.abs(want).max()


def test_prefill_attention_in_query_blocks(tiny_llama, tmp_path, monkeypatch):
    """The prefill's attention in blocks of 7 queries (runtimes.tvmrt.QUERY_BLOCK, 64 by default;
    each block scores the keys up to its last query): a 24-token prompt and a 9-token continuation
    after it match the reference runtime, as in one block."""
    ir = load_model(tiny_llama)
    opts = _write(ir, tmp_path / "a")
    ids = _ids(ir, 33)
    want = ReferenceSession(lt.lowered_ir(ir, opts), dtype=np.float64).logits(ids)
    s = TvmSession(tmp_path / "a")
    one = s.logits(ids)
    monkeypatch.setattr("runtimes.tvmrt.QUERY_BLOCK", 7)
    s.reset()
    got = np.concatenate([s._head(s._forward(ids[:24])), s._head(s._forward(ids[24:]))])
    for g in (one, got):
        assert np.abs(g - want).max() <= REL * np.abs(want).max()
    assert np.abs(got - one).max() <= 1e-5 * np.abs(one).max()


def test_pruned_sorted_model_with_fused_low_rank_branches_at_every_rate(tiny_llama, tiny_llama_lora, tmp_path):
    """A sorted model carrying four rates with a LoRA kept as low-rank branches (fused into the
    kernels' A/B): every rate equals the reference, decode with the cache equals recompute, and
    switching mid-context follows the reference's KV policy."""
    ir = _pruned(tiny_llama, tiny_llama_lora)
    assert any(lin.low_rank for lin in ir.linears.values())
    opts = _write(ir, tmp_path / "a")
    s = TvmSession(tmp_path / "a")
    ref = ReferenceSession(lt.lowered_ir(ir, opts), dtype=np.float64)
    ids = _ids(ir)
    outs = {}
    for r in RATES:
        s.set_prune_rate(r)
        ref.set_prune_rate(r)
        outs[r], want = s.logits(ids), ref.logits(ids)
        assert np.abs(outs[r] - want).max() <= REL * np.abs(want).max(), r
        # cached decode = full recompute
        last = s._start(ids[:10])
        steps = [s._step(t) for t in ids[10:14]]
        np.testing.assert_allclose(np.stack([last] + steps), outs[r][9:14], rtol=0, atol=REL * np.abs(want).max())
    assert all(np.abs(outs[r] - outs[0.0]).max() > 1e-2 for r in RATES[1:])
    for kv in ("keep", "recompute"):
        for sess in (s, ref):
            sess.set_prune_rate(0.0)
        got, want = [s._start(ids[:8])], [ref._start(ids[:8])]
        for rate, t in zip((0.35, 0.15, 0.0, 0.25), ids[8:]):
            for sess in (s, ref):
                sess.set_prune_rate(rate, kv=kv)
            got.append(s._step(t))
            want.append(ref._step(t))
        np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=0, atol=REL * np.abs(np.stack(want)).max())
    with pytest.raises(EdgeqError, match="not carried"):
        s.set_prune_rate(0.5)
    w = [s.resident_weight_bytes(r) for r in RATES]
    assert all(a > b for a, b in zip(w, w[1:]))


def test_tampered_library_is_refused(tiny_qwen2, tmp_path):
    ir = load_model(tiny_qwen2)
    _write(ir, tmp_path / "a")
    lib = tmp_path / "a" / lt.LIBRARY
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(EdgeqError, match="refusing to load"):
        TvmSession(tmp_path / "a")
    from edgeq.verify import verify

    rep = verify(tmp_path / "a")
    assert not rep.ok and any("sha256" in p for p in rep.problems)


def test_lowering_is_deterministic(tiny_qwen2, tmp_path):
    ir = load_model(tiny_qwen2)
    for d in ("a", "b"):
        _write(ir, tmp_path / d)
    for f in (lt.LIBRARY, lt.WEIGHTS, lt.TOKENIZER_FILE, "manifest.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.skipif(bool(os.environ.get("EDGEQ_SKIP_CROSS")), reason="EDGEQ_SKIP_CROSS set")
def test_aarch64_target_builds_and_refuses_to_run_here(tiny_llama, tmp_path):
    """mobile-arm64: an aarch64 shared library, cross-linked with Debian's aarch64 gcc (make
    install provides it; missing tools are a failure, the opt-out is EDGEQ_SKIP_CROSS=1)."""
    import subprocess

    from edgeq.kernels.emulate import tools_missing

    assert not tools_missing(), f"aarch64 cross tools missing: {tools_missing()} (make cross-tools, or EDGEQ_SKIP_CROSS=1)"
    ir = load_model(tiny_llama)
    out = tmp_path / "arm"
    out.mkdir()
    info = lt.write_tvm(ir, out, lt.TvmOptions(bits=4, group=32, target={
        "kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}))
    write_manifest(out, {"format": "tvm", "tvm": info, "hparams": ir.hparams.to_json()})
    assert "aarch64" in subprocess.run(["file", str(out / lt.LIBRARY)], capture_output=True, text=True).stdout
    with pytest.raises(EdgeqError, match="run it on that device"):
        TvmSession(out)


def test_cuda_target_builds_and_refuses_to_run_here(tiny_llama, tmp_path):
    """gpu-t4: a CUDA module; the runtime here says where it runs, verify checks its files and
    says to verify on the device."""
    ir = load_model(tiny_llama)
    out = tmp_path / "t4"
    out.mkdir()
    info = lt.write_tvm(ir, out, lt.TvmOptions(bits=4, group=32, target={"kind": "cuda", "arch": "sm_75"}))
    write_manifest(out, {"format": "tvm", "tvm": info, "hparams": ir.hparams.to_json(), "target": "gpu-t4"})
    with pytest.raises(EdgeqError, match="CUDA"):
        TvmSession(out)
    from edgeq.verify import verify

    rep = verify(out)
    assert not rep.ok and "verify it on that device" in rep.problems[0]
    assert info["block"] == 32
    assert read_manifest(out)["tvm"] == info  # what the manifest holds is what write_tvm reported
    assert (out / info["library"]).is_file() and info["library"] in read_manifest(out)["files"]


def test_refuses_what_it_cannot_express(tiny_llama):
    ir = load_model(tiny_llama)
    assert lt.check(ir, lt.TvmOptions(bits=3, target=HOST))
    wide = lt.TvmOptions(bits=4, target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    assert not lt.check(ir, wide)


def test_runtime_alone_no_torch_no_tvm_compiler(tiny_qwen2, tmp_path):
    """Device side, in a fresh process: TVM's runtime library only (not the compiler), torch and
    transformers unimportable; switch rates and generate."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ir = _pruned(tiny_qwen2)
    _write(ir, tmp_path / "a")
    repo = Path(__file__).resolve().parents[2]
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from edgeq.session import open_session\n"
            f"s = open_session({str(tmp_path / 'a')!r}, n_ctx=64)\n"
            "s.set_prune_rate(0.35)\n"
            "out = list(s.generate_ids([1, 2, 3], 4, stop_at_eos=False))\n"
            "import tvm, os\n"
            "assert os.environ.get('TVM_USE_RUNTIME_LIB') == '1'\n"
            "assert not any('libtvm_compiler' in l for l in open('/proc/self/maps'))\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEQ_TVM_COMPILER", "TVM_USE_RUNTIME_LIB")}
    env["PYTHONPATH"] = str(repo)
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def _kernel_bytes(path):
    from edgeq.frontend.safetensors_io import read_header

    header, _ = read_header(path)
    return sum(e - s for n, v in header.items() for s, e in [v["data_offsets"]]
               if n.endswith((".qw", ".sc", ".zp", ".a", ".b")))


def test_weights_are_memory_mapped_in_place(tiny_llama, tiny_llama_lora, tmp_path):
    """The weights file's data section is 64-byte aligned (TVM's DLPack import requires it), so
    every kernel array is handed to the kernels as a view of the memory-mapped file: no copy."""
    ir = _pruned(tiny_llama, tiny_llama_lora)
    _write(ir, tmp_path / "a")
    path = tmp_path / "a" / lt.WEIGHTS
    from edgeq.frontend.safetensors_io import read_header

    _, data_start = read_header(path)
    assert data_start % 64 == 0
    s = TvmSession(tmp_path / "a")
    assert s.copied_weights == 0
    assert s.mapped_weights == _kernel_bytes(path) > 0


def test_artifact_with_unaligned_weights_still_runs_identically(tiny_qwen2, tmp_path):
    """An artifact written before the alignment (8-byte aligned header, as safetensors' own
    writer pads it): its kernel arrays are copied into aligned buffers; same logits."""
    from safetensors.numpy import load_file, save_file

    ir = load_model(tiny_qwen2)
    _write(ir, tmp_path / "a")
    ids = _ids(ir)
    want = TvmSession(tmp_path / "a").logits(ids)
    path = tmp_path / "a" / lt.WEIGHTS
    arrays = load_file(str(path))
    save_file(arrays, str(path))  # same arrays, data section only 8-byte aligned
    from edgeq.frontend.safetensors_io import read_header

    _, data_start = read_header(path)
    s = TvmSession(tmp_path / "a")
    if data_start % 64:
        assert s.copied_weights > 0
    assert s.copied_weights + s.mapped_weights == _kernel_bytes(path)
    np.testing.assert_array_equal(s.logits(ids), want)

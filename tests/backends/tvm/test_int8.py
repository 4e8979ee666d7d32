"""TVM artifacts with int8-activation kernels (the profile's ``[deploy] tvm_activations = "int8"``):
the same weights as the float artifact in the integer-dot layout (the embedding rows read back
bit for bit), logits within the activation rounding of the float artifact's at every pruning rate,
the choice recorded in the manifest, and refused for a target without dot instructions. On
AVX2 (the cpu-avx2 profile's haswell, run on this host) the 8-bit head keeps float activations
(``head_act``): its table stays in the float layout."""
import platform
from pathlib import Path

import numpy as np
import pytest

import tvm  # noqa: F401

from edgeq.artifact import write_manifest
from edgeq.backends.tvm import lower as lt
from edgeq.frontend import load_model
from runtimes.tvmrt import TvmSession

VNNI = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}  # the cpu-avx512 profile's target
HASWELL = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}  # the cpu-avx2 profile's target
CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="artifacts built for an x86 profile")


def _write(ir, out, act, target=VNNI):
    out.mkdir(parents=True)
    info = lt.write_tvm(ir, out, lt.TvmOptions(bits=4, group=32, target=target, act=act))
    m = {"format": "tvm", "tvm": info, "hparams": ir.hparams.to_json()}
    if ir.prune is not None:
        m["prune"] = {"rates": list(ir.prune.rates), "widths": ir.prune.to_json()["widths"]}
    write_manifest(out, m)
    return info


@pytest.mark.parametrize("target,flag", [(VNNI, "avx512_vnni"), (HASWELL, "avx2")], ids=["avx512vnni", "avx2"])
def test_int8_artifact_against_the_float_one(tiny_llama, tmp_path, target, flag):
    from edgeq.passes.naive_sort import naive_sort
    from edgeq.passes.rate_plan import apply_prune_spec, plan_rates

    ir = naive_sort(load_model(tiny_llama))
    ir = apply_prune_spec(ir, plan_rates(ir, (0.0, 0.25), granularity=32, importance=np.array([0.1, 0.3])))
    fl, q8 = _write(ir, tmp_path / "f", "float32", target), _write(ir, tmp_path / "q", "int8", target)
    assert q8["act"] == "int8" and fl["act"] == "float32" and fl["head_act"] == "float32"
    head_q8 = target is VNNI  # AVX2: the 8-bit head stays float (its sign trick measured slower)
    assert q8["head_act"] == ("int8" if head_q8 else "float32")
    for name, k in q8["kernels"].items():
        assert k.endswith("_q8") == (head_q8 or name.startswith("blk.")), name
    assert any(f.endswith(("_q8_decode", "_q8_prefill")) for f in q8["functions"])
    assert all(f.endswith(("_q8_decode", "_q8_prefill")) == (head_q8 or not f.startswith("qgemm_i8"))
               for f in q8["functions"])
    assert q8["decoder"]["embed"].endswith("_q8") == head_q8 and not fl["decoder"]["embed"].endswith("_q8")
    if flag not in CPU_FLAGS:
        pytest.skip("host has no AVX-512 VNNI / AVX-VNNI: compiled, not run")
    sf, sq = TvmSession(tmp_path / "f"), TvmSession(tmp_path / "q")
    ids = [int(t) for t in np.random.default_rng(0).integers(0, ir.hparams.vocab_size, 24)]
    np.testing.assert_array_equal(sq._embed(np.array(ids)), sf._embed(np.array(ids)))
    for rate in (0.0, 0.25):
        sf.set_prune_rate(rate)
        sq.set_prune_rate(rate)
        a, b = sf.logits(ids), sq.logits(ids)  # prefill kernels (24 rows)
        err = np.abs(a - b).max() / np.abs(a).max()
        assert 0 < err < 0.05, (rate, err)  # int8 activations: ~1e-2 here, not the float kernels' bits
        last = sq._start(ids[:10])  # cached decode (1-row kernels) = recompute
        np.testing.assert_allclose(np.stack([last] + [sq._step(t) for t in ids[10:13]]), b[9:13],
                                   rtol=0, atol=1e-4 * np.abs(b).max())


def test_int8_needs_a_dot_instruction(tiny_llama, tmp_path):
    ir = load_model(tiny_llama)
    avx = lt.TvmOptions(bits=4, target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sandybridge"},
                        act="int8")
    assert any("integer dot products" in p for p in lt.check(ir, avx))
    haswell = lt.TvmOptions(bits=4, target=HASWELL, act="int8")
    assert not lt.check(ir, haswell) and haswell.head_act == "float32"


def test_mobile_arm64_int8_library_is_cross_built_with_sdot(tiny_llama, tmp_path):
    """The mobile-arm64 profile's target with int8 activations: an aarch64 library whose kernels
    use ``sdot`` (the kernels themselves run under qemu in tests/kernels/test_tir_dot.py)."""
    import subprocess

    from edgeq.kernels.emulate import tools_missing
    from edgeq.targets import load_target

    assert not tools_missing(), f"aarch64 cross tools missing: {tools_missing()} (make cross-tools)"
    ir = load_model(tiny_llama)
    out = tmp_path / "arm"
    out.mkdir()
    target = load_target("mobile-arm64").compile_target.as_dict()
    info = lt.write_tvm(ir, out, lt.TvmOptions(bits=4, group=32, target=target, act="int8"))
    assert info["act"] == "int8" and info["block"] == 16
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(out / lt.LIBRARY)], capture_output=True,
                         text=True).stdout
    assert "sdot" in dis


def test_tvm_activations_option_overrides_the_profile(tiny_llama, tmp_path):
    """``edgeq build --tvm-activations``: cpu-avx2 builds int8 kernels by default (AVX2), float32 on
    request, recorded in the manifest (and the build options only when given); another format
    or value is one error line and no artifact."""
    import json

    from prune_cli import run_cli

    acts = {}
    for args in ((), ("--tvm-activations", "float32")):
        out = tmp_path / f"t{len(args)}"
        code, text = run_cli("build", tiny_llama, "--format", "tvm", "--bits", "4", *args, "-o", out)
        assert code == 0, text
        m = json.loads((out / "manifest.json").read_text())
        acts[args] = (m["tvm"]["act"], m["tvm"]["head_act"], m["options"].get("tvm_activations"))
        code, text = run_cli("verify", out)
        assert code == 0 and "OK" in text, text
    assert acts == {(): ("int8", "float32", None), ("--tvm-activations", "float32"): ("float32", "float32", "float32")}
    for args, msg in ((("--format", "gguf", "--bits", "4", "--tvm-activations", "int8"), "this build writes gguf"),
                      (("--format", "tvm", "--bits", "4", "--tvm-activations", "int4"), "Invalid value")):
        code, text = run_cli("build", tiny_llama, *args, "-o", tmp_path / "x")
        assert code != 0 and msg in text, text
        assert "Traceback" not in text and not (tmp_path / "x").exists()

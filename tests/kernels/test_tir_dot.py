"""int8-activation kernels (per-group int8 x, integer dot products; edgeq/kernels/tir_dot.py) vs
the numpy oracle of the same arithmetic (edgeq/kernels/act_quant.py): AVX-512 VNNI and AVX-VNNI
run where the host has them, AVX2 (``vpmaddubsw`` + ``vpmaddwd``) on any x86-64 host with AVX2,
aarch64 ``sdot`` under qemu; the instructions checked in the generated code."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tvm

from edgeq.errors import EdgeqError
from edgeq.kernels import act_quant, emulate, layout
from edgeq.kernels import compile as kc
from edgeq.kernels.spec import KernelSpec
from kernel_weights import random_weights

VNNI512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"}  # the cpu-avx512 profile
AVXVNNI = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"}
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
HASWELL = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}  # the cpu-avx2 profile
SANDY = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "sandybridge"}  # AVX, no AVX2
REL = 1e-5  # the float epilogue (scales, low-rank branch) vs the float64 oracle
CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
NO_VNNI = "host has no AVX-512 VNNI / AVX-VNNI: compiled, not run"

SPECS = [KernelSpec(bits=b, symmetric=s, rank=r, block=32, act="int8", prefill=p)
         for b in (4, 8) for s in (True, False) for r in (0, 16) for p in (False, True)]
SPECS += [KernelSpec(bits=4, group=128, rank=32, block=32, act="int8", lr_dtype="float16"),
          KernelSpec(bits=8, group=64, block=32, act="int8")]


def _integer_case(spec, n, k, seed=0):
    """Weights with every scale 1 (zero points integers) and x integer / half-integer valued with
    max |x| = 127 in every group: the activation scale is exactly 1, so the kernel's float
    epilogue is exact and y must equal the oracle's integer sums bit for bit. The half-integers
    land on rounding ties (round half to even in both)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << spec.bits, (n, k)).astype(np.uint8)
    ng = k // spec.group
    zp = None if spec.symmetric else rng.integers(0, 1 << spec.bits, (n, ng)).astype(np.float32)
    arrays = layout.pack_weight(codes, np.ones((n, ng), np.float32), zp, spec)
    m = 3 if spec.prefill else 1
    x = (rng.integers(-254, 255, (m, k)) / 2).astype(np.float32)
    x.reshape(m, ng, spec.group)[:, :, 0] = 127.0 * rng.choice([-1, 1], (m, ng))
    return arrays, x


def _exact(spec, arrays, x, n):
    xq, dx = act_quant.quantize_activations(x, spec.group)
    assert (dx == 1).all()
    sums = act_quant.integer_sums(spec, arrays, xq, n)  # (M, n, G)
    xs = xq.astype(np.int64).reshape(x.shape[0], -1, spec.group).sum(-1)
    if spec.symmetric:
        return (sums - spec.zero_point * xs[:, None, :]).sum(-1)
    zp = np.moveaxis(arrays["zp"], -1, 1).reshape(-1, arrays["zp"].shape[1])[:n, :xs.shape[1]].astype(np.int64)
    return (sums - zp[None] * xs[:, None, :]).sum(-1)


def _random_case(spec, n, k, seed=0):
    arrays, _, rng = random_weights(spec, n, k, seed)
    return arrays, rng.standard_normal((5 if spec.prefill else 1, k)).astype(np.float32)


def _inputs(spec, arrays, x, n):
    return [x] + [arrays[a] for a in spec.args()[1:-1]] + [np.zeros((x.shape[0], n), np.float32)]


def _call(ex, spec, arrays, x, n):
    ts = [tvm.runtime.tensor(a, tvm.cpu()) for a in _inputs(spec, arrays, x, n)]
    ex[spec.name](*ts)
    return ts[-1].numpy()


def _widths(spec, n, k):
    """Full, and pruned (a prefix of output blocks / input groups)."""
    return ((n, k), (n - spec.block, k - spec.group), (spec.block, spec.group))


def test_dot_isa_of_the_profiles():
    assert kc.dot_isa(VNNI512) == "avx512vnni" and kc.dot_isa(AVXVNNI) == "avxvnni"
    assert kc.dot_isa(AARCH64) == "sdot" and kc.dot_isa(HASWELL) == "avx2" and kc.dot_isa(SANDY) is None
    assert kc.dot_isa({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}) is None


def test_a_target_without_dot_instructions_is_refused():
    with pytest.raises(EdgeqError, match="integer dot products"):
        kc.build([KernelSpec(bits=4, block=32, act="int8")], SANDY)
    with pytest.raises(EdgeqError, match="integer dot products"):
        kc.build([KernelSpec(bits=4, block=32, act="int8")], {"kind": "cuda", "arch": "sm_86"})
    with pytest.raises(EdgeqError, match="activations"):
        KernelSpec(act="int4")


@pytest.mark.parametrize("target,isa,reg", [(VNNI512, "avx512vnni", "zmm"), (AVXVNNI, "avxvnni", "ymm")])
def test_x86_kernels_use_vpdpbusd(target, isa, reg):
    ex = kc.build(SPECS[:4], target)
    dots = [ln for ln in ex.mod.inspect_source("asm").splitlines() if "vpdpbusd" in ln]
    assert dots and all(reg in ln for ln in dots)
    if isa == "avxvnni":
        assert all("{vex}" in ln for ln in dots)  # VEX-encoded AVX-VNNI, no AVX-512 needed


def test_avx2_kernels_use_vpmaddubsw():
    """AVX2 has no dot instruction: byte products by vpmaddubsw, widened by vpmaddwd, 8-bit codes'
    signs moved onto the activations by vpsignb; no vpdpbusd (not on a Haswell)."""
    asm = kc.build(SPECS[:4] + SPECS[8:12], HASWELL).mod.inspect_source("asm")
    ops = {op: [ln for ln in asm.splitlines() if op in ln] for op in ("vpmaddubsw", "vpmaddwd", "vpsignb")}
    assert all(ops.values()) and all("ymm" in ln for lns in ops.values() for ln in lns)
    assert "vpdpbusd" not in asm and "zmm" not in asm


@pytest.fixture(scope="module", params=[VNNI512, AVXVNNI, HASWELL], ids=["avx512vnni", "avxvnni", "avx2"])
def x86(request):
    flag = {"avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "avx2": "avx2"}[kc.dot_isa(request.param)]
    if flag not in CPU_FLAGS:
        pytest.skip(NO_VNNI)
    return kc.build(SPECS, request.param)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_x86_integer_sums_are_exact(x86, spec):
    n, k = 4 * spec.block, 3 * max(spec.group, 128)
    arrays, x = _integer_case(spec, n, k)
    for nn, kk in _widths(spec, n, k):
        if spec.rank:  # the integer part only: zero low-rank factors
            arrays.update(layout.pack_low_rank(np.zeros((spec.rank, k), np.float32),
                                               np.zeros((n, spec.rank), np.float32), spec))
        y = _call(x86, spec, arrays, x[:, :kk], nn)
        np.testing.assert_array_equal(y, _exact(spec, arrays, x[:, :kk], nn).astype(np.float32))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_x86_kernels_match_the_oracle(x86, spec):
    n, k = 4 * spec.block, 3 * max(spec.group, 128)
    arrays, x = _random_case(spec, n, k)
    for nn, kk in _widths(spec, n, k):
        y = _call(x86, spec, arrays, x[:, :kk], nn)
        ref = act_quant.reference(spec, arrays, x[:, :kk], nn)
        assert np.abs(y - ref).max() <= REL * np.abs(ref).max(), (nn, kk)


def test_int8_error_vs_float_is_within_the_activation_rounding(x86):
    """|y_int8 - y_float| <= Σ_k |w_nk| dx_g / 2 (x rounded to its int8 grid, half a step per
    element): the kernel loses what the activation quantization loses, no more."""
    spec = KernelSpec(bits=4, block=32, act="int8")
    arrays, x = _random_case(spec, 128, 576, seed=3)
    y = _call(x86, spec, arrays, x, 128)
    w = layout.unpack_weight(arrays, spec).astype(np.float64)
    _, dx = act_quant.quantize_activations(x, spec.group)
    bound = np.abs(w).reshape(128, -1, spec.group).sum(-1) @ (dx[0].astype(np.float64) / 2)
    err = np.abs(y[0] - x[0].astype(np.float64) @ w.T)
    assert (err <= bound * (1 + 1e-4) + 1e-5).all()
    assert err.max() > 0  # int8 activations are not the float kernel


@pytest.mark.skipif(bool(os.environ.get("EDGEQ_SKIP_CROSS")), reason="EDGEQ_SKIP_CROSS set")
def test_aarch64_sdot_kernels_under_qemu(tmp_path):
    specs = [KernelSpec(bits=4, rank=16, block=16, act="int8"), KernelSpec(bits=8, block=16, act="int8"),
             KernelSpec(bits=8, symmetric=False, block=16, act="int8", prefill=True),
             KernelSpec(bits=4, symmetric=False, rank=16, block=16, act="int8", lr_dtype="float16")]
    ex = kc.build(specs, AARCH64)
    obj = kc.write_object(ex, tmp_path / "kernels.o")
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(obj)], capture_output=True, text=True).stdout
    assert "sdot" in dis and ".16b" in dis
    for spec in specs:
        exe = emulate.link(obj, spec, tmp_path / spec.name)
        n, k = 4 * spec.block, 256
        arrays, x = _integer_case(spec, n, k)
        if spec.rank:
            arrays.update(layout.pack_low_rank(np.zeros((spec.rank, k), np.float32),
                                               np.zeros((n, spec.rank), np.float32), spec))
        for nn, kk in _widths(spec, n, k)[:2]:
            y = emulate.run(exe, _inputs(spec, arrays, x[:, :kk], nn), len(spec.args()) - 1, tmp_path)
            np.testing.assert_array_equal(y, _exact(spec, arrays, x[:, :kk], nn).astype(np.float32))
        arrays, x = _random_case(spec, n, k)
        y = emulate.run(exe, _inputs(spec, arrays, x, n), len(spec.args()) - 1, tmp_path)
        ref = act_quant.reference(spec, arrays, x, n)
        assert np.abs(y - ref).max() <= REL * np.abs(ref).max(), spec.name

"""Generated TVM kernels (dequant GEMV/GEMM + fused low-rank branch) vs the numpy reference:
x86 AVX2 (and AVX-512 where the host has it) run here, aarch64 NEON under qemu, CUDA compiled
with nvcc for the three GPU profiles' architectures."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tvm

from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.kernels import compile as kc  # noqa: E402
from edgeq.kernels import emulate, layout  # noqa: E402
from edgeq.kernels.spec import KernelSpec  # noqa: E402
from cuda_tools import cubin_listing  # noqa: E402
from kernel_weights import random_weights  # noqa: E402

HASWELL = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
REL = 1e-5  # float parts: max abs error relative to the largest output

SPECS = [KernelSpec(bits=b, symmetric=s, rank=r, block=8, prefill=p)
         for b in (4, 8) for s in (True, False) for r in (0, 16) for p in (False, True)]
SPECS += [KernelSpec(bits=4, group=128, rank=32, block=8), KernelSpec(bits=8, group=64, rank=32, block=8, prefill=True),
          KernelSpec(bits=4, rank=32, block=32), KernelSpec(bits=4, symmetric=False, rank=4, block=32, prefill=True),
          KernelSpec(bits=4, rank=32, block=32, lr_dtype="float16"),
          KernelSpec(bits=8, symmetric=False, rank=16, block=8, prefill=True, lr_dtype="float16")]


def _weights(spec, n, k, seed=0):
    arrays, t, _ = random_weights(spec, n, k, seed)
    return arrays, t


def _inputs(spec, arrays, x, n):
    return [x] + [arrays[a] for a in spec.args()[1:-1]] + [np.zeros((x.shape[0], n), np.float32)]


def _call(ex, spec, arrays, x, n):
    dev = tvm.cpu()
    ts = [tvm.runtime.tensor(a, dev) for a in _inputs(spec, arrays, x, n)]
    ex[spec.name](*ts)
    return ts[-1].numpy()


def _cases(spec, shapes=((4, 256), (3, 384))):
    """(arrays, x, n) over shapes (output blocks, K) at full and pruned widths (a prefix of
    output blocks / of input groups)."""
    rng = np.random.default_rng(1)
    # prefill: rows in register blocks (tir_cpu.prefill_rows: 8 at block 8, 2 at block 32) and a remainder
    rows = (5, 19) if spec.prefill else (1,)
    for blocks, K in shapes:
        N = blocks * spec.block
        arrays, _ = _weights(spec, N, K)
        for n, k in ((N, K), (N - spec.block, K - spec.group), (spec.block, spec.group)):
            for m in rows:
                yield arrays, rng.standard_normal((m, k)).astype(np.float32), n


@pytest.fixture(scope="module")
def x86():
    return kc.build(SPECS, HASWELL)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_x86_avx2_kernels_match_reference(x86, spec):
    for arrays, x, n in _cases(spec):
        y = _call(x86, spec, arrays, x, n)
        ref = layout.reference(spec, arrays, x, n)
        assert y.shape == ref.shape
        assert np.abs(y - ref).max() <= REL * np.abs(ref).max(), (n, x.shape)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False)])
def test_integer_part_is_exact(x86, bits, sym):
    """One-hot inputs: each output is one dequantized weight, s * (q - z), bit for bit."""
    spec = KernelSpec(bits=bits, symmetric=sym, block=8)
    arrays, t = _weights(spec, 64, 128)
    eye = np.eye(128, dtype=np.float32)
    got = np.stack([_call(x86, spec, arrays, eye[k:k + 1], 64)[0] for k in range(0, 128, 7)], axis=1)
    np.testing.assert_array_equal(got, t.dequantize()[:, ::7])


def test_kernel_block_follows_the_isa():
    assert kc.kernel_block(HASWELL) == 32 and kc.kernel_block(AVX512) == 32 and kc.kernel_block(AARCH64) == 16
    assert kc.kernel_block({"kind": "cuda", "arch": "sm_86"}) == 32


def test_x86_avx512_kernels(tmp_path):
    specs = [KernelSpec(bits=4, rank=32, block=16), KernelSpec(bits=8, symmetric=False, rank=16, block=16, prefill=True)]
    ex = kc.build(specs, AVX512)
    asm = ex.mod.inspect_source("asm")
    assert "zmm" in asm  # compiled for the AVX-512 profile: 512-bit registers (ymm is AVX2)
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("host has no AVX-512: compiled, not run")
    for spec in specs:
        for arrays, x, n in _cases(spec, shapes=((4, 256),)):
            ref = layout.reference(spec, arrays, x, n)
            assert np.abs(_call(ex, spec, arrays, x, n) - ref).max() <= REL * np.abs(ref).max()


@pytest.mark.skipif(bool(os.environ.get("EDGEQ_SKIP_CROSS")), reason="EDGEQ_SKIP_CROSS set")
def test_aarch64_neon_kernels_under_qemu(tmp_path):
    """Cross-compiled with LLVM for aarch64 (NEON + dotprod), linked statically with Debian's
    aarch64 gcc, run under qemu-aarch64 (make install provides both)."""
    specs = [KernelSpec(bits=4, rank=16, block=8), KernelSpec(bits=4, symmetric=False, block=8, prefill=True),
             KernelSpec(bits=8, rank=32, block=8), KernelSpec(bits=4, rank=16, block=16, lr_dtype="float16")]
    ex = kc.build(specs, AARCH64)
    obj = kc.write_object(ex, tmp_path / "kernels.o")
    for spec in specs:
        exe = emulate.link(obj, spec, tmp_path / spec.name)
        for arrays, x, n in _cases(spec, shapes=((4, 256),)):
            y = emulate.run(exe, _inputs(spec, arrays, x, n), len(spec.args()) - 1, tmp_path)
            ref = layout.reference(spec, arrays, x, n)
            assert np.abs(y - ref).max() <= REL * np.abs(ref).max(), (spec.name, n, x.shape)
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(obj)], capture_output=True, text=True).stdout
    assert "fmla" in dis and ".4s" in dis  # NEON vector code


@pytest.mark.parametrize("arch", ["sm_75", "sm_86", "sm_89"])
def test_cuda_kernels_compile_with_nvcc(tmp_path, arch):
    specs = [KernelSpec(bits=4, rank=32, block=32), KernelSpec(bits=8, symmetric=False, block=32, prefill=True),
             KernelSpec(bits=4, rank=16, block=32, lr_dtype="float16")]
    ex = kc.build(specs, {"kind": "cuda", "arch": arch})
    src = kc.cuda_source(ex)
    assert all(s.name in src for s in specs)
    cubin = kc.nvcc_cubin(src, arch, tmp_path / f"k_{arch}.cubin")
    listing = cubin_listing(cubin, arch)
    for s in specs:
        assert s.name in listing


def test_bad_specs_are_refused():
    with pytest.raises(EdgeqError, match="bits"):
        KernelSpec(bits=3)
    with pytest.raises(EdgeqError, match="block"):
        KernelSpec(block=6)
    with pytest.raises(EdgeqError, match="dtype"):
        KernelSpec(lr_dtype="bfloat16")
    with pytest.raises(EdgeqError, match="multiple of the kernel block"):
        layout.pack_weight(np.zeros((12, 32), np.uint8), np.ones((12, 1), np.float32), None, KernelSpec())

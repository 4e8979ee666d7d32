"""Compile generated kernels with TVM 0.27 for a hardware profile's ``[compile] tvm_target``.

* :func:`kernel_block` — the layout / vector block a target gets (x86 32, aarch64 16, CUDA 32).
* :func:`dot_isa` — the integer dot instruction a target has (``avx512vnni``, ``avxvnni``, ``sdot``
  or None), asked of LLVM for the target's CPU and attributes.
* :func:`prim_func` — a spec's TIR (CPU or CUDA form), parsed from :mod:`tir_cpu` / :mod:`tir_cuda`
  (int8-activation specs from :mod:`tir_dot`, for the target's dot instruction).
* :func:`build` — one TVM executable holding every spec's function (and the decoder functions of a
  :class:`~edgeq.kernels.tir_decoder.DecoderSpec` when given: :mod:`tir_decoder`'s CPU form or
  :mod:`tir_decoder_cuda`'s CUDA form, by target), compiled for the *profile's*
  target (never the build host): x86 / aarch64 through LLVM, CUDA as source for the device.
* :func:`export` — a shared library: host linker for x86, ``aarch64-linux-gnu-gcc`` for aarch64
  (cross; another cross compiler's name in ``EDGEQ_AARCH64_CC``), the CUDA module with its kernel source embedded (compiled on the device at load).
* :func:`cuda_source` / :func:`nvcc_cubin` — the CUDA C++ TVM generated, and a cubin of it
  compiled with ``nvcc`` for one ``sm_XY`` (a build-time check that the kernels compile).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Mapping

from edgeq.errors import EdgeqError
from edgeq.kernels import tir_cpu, tir_cuda, tir_decoder_cuda, tir_dot
from edgeq.kernels.spec import KernelSpec
from edgeq.kernels.tir_decoder import DecoderSpec

# the aarch64 cross compiler and linker (Debian's name; EDGEQ_AARCH64_CC: another toolchain's, e.g.
# aarch64-none-linux-gnu-gcc; read at import, and passed on to Ray workers as every EDGEQ_* variable)
AARCH64_CC = os.environ.get("EDGEQ_AARCH64_CC") or "aarch64-linux-gnu-gcc"


def _tvm():
    try:
        import tvm  # noqa: F401
    except ImportError:
        raise EdgeqError("generating kernels needs TVM: pip install 'edgeq[tvm]' (apache-tvm 0.27)") from None
    return tvm


def is_cuda(target: Mapping) -> bool:
    return target.get("kind") == "cuda"


def is_aarch64(target: Mapping) -> bool:
    return str(target.get("mtriple", "")).startswith("aarch64")


def kernel_block(target: Mapping) -> int:
    """Output channels per vector block: 32 on x86 (4 AVX2 / 2 AVX-512 registers of lanes per
    input position: measured 1.7x faster than 8 on AVX2, equal to 64), 16 on aarch64 (4 NEON
    registers), 32 on CUDA (a warp)."""
    if is_cuda(target) or not is_aarch64(target):
        return 32
    return 16


def dot_isa(target: Mapping) -> str | None:
    """The integer dot instruction of an LLVM CPU target (its ``mcpu`` / ``mattr`` as LLVM knows
    them): AVX-512 VNNI first (zmm), then AVX-VNNI (ymm), then AVX2's ``vpmaddubsw`` pair (no dot
    instruction, the same products in two), aarch64 dotprod; None without one."""
    if is_cuda(target):
        return None
    tvm = _tvm()
    from tvm.target.codegen import target_has_features

    t = _target(target)
    if is_aarch64(target):
        return "sdot" if target_has_features("dotprod", t) else None
    for feature in ("avx512vnni", "avxvnni", "avx2"):
        if target_has_features(feature, t):
            return feature
    return None


def prim_func(spec: KernelSpec, cuda: bool = False, isa: str | None = None):
    tvm = _tvm()
    from tvm.script import tirx as T

    if spec.act == "int8":
        if cuda or isa is None:
            raise EdgeqError(f"{spec.name}: int8 activations need integer dot products (AVX-512 VNNI, "
                             "AVX-VNNI, AVX2 or aarch64 dotprod); this target has none")
        src = tir_dot.source(spec, isa)
    else:
        src = tir_cuda.source(spec) if cuda else tir_cpu.source(spec)
    return tvm.script.from_source(src, extra_vars={"T": T})


def _target(target: Mapping):
    tvm = _tvm()
    t = dict(target)
    if is_cuda(t):
        host = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}
        return tvm.target.Target(t, host=host)
    return tvm.target.Target(t)


def decoder_funcs(sources: Mapping[str, str]) -> dict:
    """name -> prim_func of TVMScript sources (the decoder functions of :mod:`tir_decoder` /
    :mod:`tir_decoder_cuda`)."""
    tvm = _tvm()
    from tvm.script import tirx as T

    return {name: tvm.script.from_source(src, extra_vars={"T": T}) for name, src in sources.items()}


def decoder_sources(decoder: DecoderSpec, target: Mapping) -> dict[str, str]:
    """The decoder's functions in the target's form: CUDA kernels or CPU (LLVM) functions."""
    return tir_decoder_cuda.sources(decoder) if is_cuda(target) else decoder.sources()


def build(specs: Iterable[KernelSpec], target: Mapping, decoders: Iterable[DecoderSpec] = ()):
    """One executable with a function per spec (named ``spec.name``), plus the decoder functions
    around the kernels of each of ``decoders`` in the target's form."""
    tvm = _tvm()
    specs = list(specs)
    if not specs:
        raise EdgeqError("no kernels to build")
    cuda = is_cuda(target)
    isa = dot_isa(target) if any(s.act == "int8" for s in specs) else None
    funcs = {s.name: prim_func(s, cuda, isa) for s in specs}
    for dec in decoders:
        funcs.update(decoder_funcs(decoder_sources(dec, target)))
    mod = tvm.IRModule(funcs)
    return tvm.compile(mod, target=_target(target))


def export(ex, path: str | Path, target: Mapping) -> Path:
    path = Path(path)
    if is_aarch64(target):
        if shutil.which(AARCH64_CC) is None:
            raise EdgeqError(f"cross-linking for aarch64 needs {AARCH64_CC} (Debian: gcc-aarch64-linux-gnu)")
        ex.export_library(str(path), cc=AARCH64_CC)
    else:
        ex.export_library(str(path))
    return path


def write_object(ex, path: str | Path) -> Path:
    """The host code as one relocatable object (for static linking into a test harness)."""
    ex.mod.write_to_file(str(path))
    return Path(path)


def cuda_source(ex) -> str:
    mods = list(ex.mod.imports)
    if not mods:
        raise EdgeqError("not a CUDA build: no device module")
    return mods[0].inspect_source()


def nvcc_cubin(source: str, arch: str, out: str | Path) -> Path:
    """Compile CUDA source to a cubin for ``arch`` (e.g. ``sm_86``) with nvcc."""
    nvcc = shutil.which("nvcc") or next((str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/nvcc"))), None)
    if nvcc is None:
        raise EdgeqError("nvcc not found (CUDA toolkit) — needed to check the CUDA kernels")
    out = Path(out)
    src = out.with_suffix(".cu")
    src.write_text(source)
    r = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-O3", "-diag-suppress=177", "-o", str(out), str(src)],
                       capture_output=True, text=True)
    if r.returncode:
        raise EdgeqError(f"nvcc {arch} failed: {(r.stderr or r.stdout).strip().splitlines()[-1][:300]}")
    return out

"""Run cross-compiled aarch64 kernels on this x86 machine: static link with Debian's
``aarch64-linux-gnu-gcc`` against a small C caller (``harness.c``), execute under
``qemu-aarch64``. Used by the tests to check the NEON kernels against the numpy reference."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.kernels.compile import AARCH64_CC
from edgeq.kernels.spec import KernelSpec

HARNESS = Path(__file__).with_name("harness.c")
QEMU = "qemu-aarch64"


def tools_missing() -> list[str]:
    return [t for t in (AARCH64_CC, QEMU) if shutil.which(t) is None]


def _includes() -> list[str]:
    import tvm
    import tvm_ffi

    return [f"-I{Path(tvm.__file__).parent / 'include'}", f"-I{Path(tvm_ffi.__file__).parent / 'include'}"]


def link(obj: Path, spec: KernelSpec, out: Path) -> Path:
    """A static aarch64 executable calling ``spec``'s function of the object ``obj``."""
    missing = tools_missing()
    if missing:
        raise EdgeqError(f"aarch64 emulation needs {', '.join(missing)} (Debian: gcc-aarch64-linux-gnu, qemu-user)")
    r = subprocess.run([AARCH64_CC, "-O2", "-static", f"-DKERNEL=__tvm_ffi_{spec.name}", *_includes(),
                        str(HARNESS), str(obj), "-lm", "-o", str(out)], capture_output=True, text=True)
    if r.returncode:
        raise EdgeqError(f"linking the aarch64 harness failed: {r.stderr.strip()[-400:]}")
    return out


def _code(a: np.ndarray) -> str:
    return {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint8): "u8"}[a.dtype]


def run(exe: Path, tensors: Sequence[np.ndarray], out_index: int, workdir: Path) -> np.ndarray:
    """Call the kernel under qemu with ``tensors`` (the output one included); its new value."""
    args = []
    for i, a in enumerate(tensors):
        a = np.ascontiguousarray(a)
        p = workdir / f"arg{i}.bin"
        p.write_bytes(a.tobytes())
        args.append(f"{_code(a)}:{'x'.join(str(d) for d in a.shape)}:{p}")
    r = subprocess.run([QEMU, str(exe), str(out_index), *args], capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise EdgeqError(f"{exe.name} under qemu failed ({r.returncode}): {r.stderr.strip()[-300:]}")
    out = tensors[out_index]
    return np.frombuffer((workdir / f"arg{out_index}.bin").read_bytes(), dtype=out.dtype).reshape(out.shape).copy()

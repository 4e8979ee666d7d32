"""Finding CUDA's binary tools for the nvcc checks of the CUDA kernels (tests only)."""
import shutil
import subprocess
from pathlib import Path


def cuobjdump() -> str | None:
    """cuobjdump on PATH, or the one of the pip package nvidia-cuda-cuobjdump (make install)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    return next((str(p) for base in nvidia.__path__ for p in Path(base).glob("*/bin/cuobjdump")), None)


def cubin_listing(cubin: Path, arch: str) -> str:
    """cuobjdump's ELF listing of ``cubin``, checked to be for ``arch`` (e.g. ``sm_86``)."""
    tool = cuobjdump()
    assert tool, "cuobjdump not found (pip package nvidia-cuda-cuobjdump, installed by make install)"
    listing = subprocess.run([tool, "-elf", str(cubin)], capture_output=True, text=True, check=True).stdout
    assert arch.replace("_", "") in listing.lower() or arch in listing
    return listing

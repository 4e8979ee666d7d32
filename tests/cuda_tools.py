"""Finding CUDA's binary tools for the nvcc checks of the CUDA kernels (tests only)."""
import shutil
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

"""Front ends: HF checkpoint directories and GGUF files -> ModelIR; PEFT adapters."""
from __future__ import annotations

from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.frontend.hf import load_hf
from edgeq.frontend.peft import load_adapter, merge_adapters
from edgeq.ir import ModelIR

__all__ = ["load_model", "load_hf", "load_adapter", "merge_adapters"]


def load_model(path: str | Path) -> ModelIR:
    """A HF checkpoint directory (config.json + safetensors) or a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise EdgeqError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        # lazy: keeps the GGUF backend out of processes that import only a part of the front end
        # (the device runtimes read weights with edgeq.frontend.safetensors_io)
        from edgeq.backends.gguf.lower import read_gguf

        return read_gguf(path)
    if path.is_dir():
        return load_hf(path)
    raise EdgeqError(f"{path}: expected a Hugging Face checkpoint directory or a .gguf file")

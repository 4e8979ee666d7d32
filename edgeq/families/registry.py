"""The model families edgeq knows, by IR arch, HF model_type and GGUF architecture."""
from __future__ import annotations

from edgeq.errors import EdgeqError
from edgeq.families.base import Family
from edgeq.families.gemma3 import GEMMA3
from edgeq.families.llama import LLAMA
from edgeq.families.qwen2 import QWEN2
from edgeq.ir import Arch

FAMILIES: tuple[Family, ...] = (LLAMA, QWEN2, GEMMA3)
_BY_ARCH = {f.arch: f for f in FAMILIES}
_BY_MODEL_TYPE = {f.hf_model_type: f for f in FAMILIES}
_BY_GGUF_ARCH = {f.gguf_arch: f for f in FAMILIES}


def family(arch: Arch | str) -> Family:
    """The family of an IR arch (``Arch.LLAMA`` or ``"llama"``)."""
    f = _BY_ARCH.get(arch) if isinstance(arch, Arch) else _BY_ARCH.get(_arch_or_none(arch))
    if f is None:
        raise EdgeqError(f"unknown model family {getattr(arch, 'value', arch)!r} "
                         f"(supported: {', '.join(a.value for a in _BY_ARCH)})")
    return f


def _arch_or_none(s: object) -> Arch | None:
    try:
        return Arch(s)
    except ValueError:
        return None


def by_hf_model_type(model_type: object) -> Family | None:
    return _BY_MODEL_TYPE.get(model_type)  # type: ignore[arg-type]


def by_gguf_arch(name: object) -> Family | None:
    return _BY_GGUF_ARCH.get(name)  # type: ignore[arg-type]


def hf_model_types() -> tuple[str, ...]:
    return tuple(_BY_MODEL_TYPE)


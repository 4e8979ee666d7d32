"""ModelIR <-> GGUF (llama.cpp), and LowRank branches -> llama.cpp LoRA-adapter GGUF: the gguf
backend's lowering API, gathered from the modules that implement it.

* :func:`check` (check.py) — problems that stop a ModelIR (and optionally a type plan) from
  becoming a GGUF that stock llama.cpp loads.
* :func:`tensor_types` (types.py) — the per-tensor type plan for a bit width / base format,
  following ``llama_model_quantize``'s own choices (see its docstring for the rule).
* :func:`write_gguf` (write.py) — model GGUF (deterministic, atomic, streamed).
* :func:`write_lora_gguf` (lora.py) — one adapter's LowRank branches as a llama.cpp LoRA adapter.
* :func:`read_gguf` (read.py) — GGUF model file -> ModelIR (the GGUF front end).
* layout.py — architecture / tensor names, file order and the Q/K RoPE permutation, from the
  family tables (:mod:`edgeq.families`); tokenizer.py — ``tokenizer.ggml.*`` metadata.

Facts these modules rely on were checked against llama.cpp as vendored by llama-cpp-python
0.3.36 and gguf-py 0.19 (see each module's docstring).
"""
from __future__ import annotations

from edgeq.backends.gguf.check import check
from edgeq.backends.gguf.layout import GGUF_ARCH, ROLE_ORDER, gguf_tensor_name, rotate_half_to_interleaved
from edgeq.backends.gguf.lora import write_lora_gguf
from edgeq.backends.gguf.read import read_gguf
from edgeq.backends.gguf.types import LLAMA_FTYPE, base_type_of_plan, llamacpp_output_type, tensor_types
from edgeq.backends.gguf.write import fixed_overhead_bytes, write_gguf, write_model_header, write_tensors
from edgeq.quant.formats import FORMATS, as_qtype

__all__ = [
    "FORMATS",
    "GGUF_ARCH",
    "LLAMA_FTYPE",
    "ROLE_ORDER",
    "as_qtype",
    "base_type_of_plan",
    "check",
    "fixed_overhead_bytes",
    "gguf_tensor_name",
    "llamacpp_output_type",
    "read_gguf",
    "rotate_half_to_interleaved",
    "tensor_types",
    "write_gguf",
    "write_lora_gguf",
    "write_model_header",
    "write_tensors",
]

"""LowRank branches -> a llama.cpp LoRA-adapter GGUF.

LoRA adapters (``src/llama-adapter.cpp``): ``general.type = "adapter"``,
``adapter.type = "lora"``, ``general.architecture`` equal to the model's, float32
``adapter.lora.alpha``; tensors ``<base tensor name>.lora_a`` with ne ``[in, rank]`` (numpy
``(rank, in)``) and ``<base tensor name>.lora_b`` with ne ``[rank, out]`` (numpy
``(out, rank)``); the applied scale is ``alpha / rank`` (rank = ``lora_b.ne[0]``), or 1 when
``alpha == 0``, times the runtime adapter scale.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgeq.artifact import atomic_write_file
from edgeq.backends.gguf.layout import GGUF_ARCH, ROLE_ORDER, gguf_module, gguf_tensor_name, out_rows
from edgeq.backends.gguf.write import model_name
from edgeq.errors import EdgeqError
from edgeq.ir import Linear, LowRank, ModelIR, linear_name
from edgeq.quant.formats import QType, as_qtype


def write_lora_gguf(ir: ModelIR, adapter_name: str, path: str | Path, *,
                    dtype: QType | str = QType.F32) -> Path:
    """Write the LowRank branches with ``source == f"lora:{adapter_name}"`` as a llama.cpp LoRA
    adapter GGUF (``llama_adapter_lora_init`` / llama-cpp-python ``lora_path``).

    ``adapter_name`` may also be a full source string (``"qerr"``, ``"lora:x"``) to ship other
    branch kinds. Layout: ``blk.N.<role>.weight.lora_a`` numpy ``(rank, in)`` and
    ``.lora_b`` numpy ``(out, rank)`` (Q/K ``lora_b`` rows permuted like the base weights for
    the llama arch). ``adapter.lora.alpha`` is set to ``scale * rank`` of the first branch so
    llama.cpp's ``alpha / rank`` reproduces ``LowRank.scale``; a branch whose scale*rank differs
    gets the ratio folded into its ``lora_b``. ``dtype``: F32 or F16.
    """
    gguf = gguf_module()
    qt = as_qtype(dtype)
    if qt not in (QType.F32, QType.F16):
        raise EdgeqError(f"LoRA GGUF: expected dtype F32 or F16, got {qt.value}")
    if ir.arch not in GGUF_ARCH:
        raise EdgeqError(f"LoRA GGUF: architecture {ir.arch.value!r} is not supported")
    source = adapter_name if (":" in adapter_name or adapter_name == "qerr") else f"lora:{adapter_name}"
    branches: list[tuple[Linear, LowRank]] = []
    for i in range(ir.hparams.num_layers):
        for role in ROLE_ORDER:
            lin = ir.linears.get(linear_name(i, role))
            if lin is None:
                continue
            mine = [lr for lr in lin.low_rank if lr.source == source]
            if len(mine) > 1:
                raise EdgeqError(f"LoRA GGUF: {lin.name} has {len(mine)} branches from {source!r}; expected at most 1")
            if mine:
                branches.append((lin, mine[0]))
    if not branches:
        have = sorted({lr.source for l in ir.linears.values() for lr in l.low_rank})
        raise EdgeqError(f"LoRA GGUF: no low-rank branches with source {source!r} (found: {have})")
    first = branches[0][1]
    alpha = float(np.float32(first.scale * first.rank))

    def fill(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), GGUF_ARCH[ir.arch])
        try:
            w.add_type("adapter")
            w.add_name(f"{model_name(ir)}-{source.replace(':', '-')}")
            w.add_string("adapter.type", "lora")
            w.add_float32("adapter.lora.alpha", alpha)
            for lin, lr in branches:
                if lr.a.shape != (lr.rank, lin.in_features) or lr.b.shape != (lin.out_features, lr.rank):
                    raise EdgeqError(f"LoRA GGUF: {lin.name}: expected A {(lr.rank, lin.in_features)} and "
                                     f"B {(lin.out_features, lr.rank)}, got {lr.a.shape} and {lr.b.shape}")
                llama_scale = alpha / lr.rank if alpha else 1.0
                b = np.asarray(lr.b, dtype=np.float32)
                if not math.isclose(float(lr.scale), llama_scale, rel_tol=1e-6, abs_tol=0.0):
                    b = (b.astype(np.float64) * (float(lr.scale) / llama_scale)).astype(np.float32)
                b = out_rows(ir, lin, b)
                a = np.ascontiguousarray(lr.a, dtype=np.float32)
                if qt == QType.F16:
                    a, b = a.astype(np.float16), b.astype(np.float16)
                base = gguf_tensor_name(lin.name)
                w.add_tensor(f"{base}.lora_a", np.ascontiguousarray(a))
                w.add_tensor(f"{base}.lora_b", np.ascontiguousarray(b))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()

    atomic_write_file(Path(path), fill)
    return Path(path)


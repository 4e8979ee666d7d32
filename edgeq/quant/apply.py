"""Apply a :class:`edgeq.plan.Plan` to a ModelIR: grid-exact quantization + error compensation.

For every block linear whose planned type is quantized: GPTQ (or RTN) on the calibration
covariance of its input gives codes on the type's grid; the linear then carries them packed
(``Linear.packed``, written as is by the GGUF lowering) and its ``weight`` becomes exactly the
dequantized values, so every runtime (reference included) sees what the artifact holds. With
``rank > 0`` a compensation branch (``LowRank``, source ``"qerr"``, fp16 values) fitted to the
error ``W - Q(W)`` is attached (QERA's activation-aware closed form, or plain SVD).

Embedding / output head (and linears planned as F16/F32) are left as float tensors; the lowering
quantizes them round-to-nearest in their planned type (bit-exact with llama.cpp for the legacy
types).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from tqdm import tqdm

from edgeq.errors import EdgeqError
from edgeq.ir import LowRank, ModelIR, Packed, PassRecord
from edgeq.quant.codecs import codec_for
from edgeq.quant.compensate import compensation
from edgeq.quant.formats import FORMATS, as_qtype
from edgeq.quant.gptq import GPTQConfig, gptq, pack_gguf, rtn
from edgeq.spill import spill, spill_array

COMP_SOURCE = "qerr"


def quantize_ir(ir: ModelIR, plan, stats, progress: bool = True, cache: dict | None = None) -> ModelIR:
    """A new ModelIR with the plan's quantization applied to every block linear.

    ``cache``: a dict reused across calls on the *same* IR and statistics (e.g. several plans
    of one model in a benchmark) so each (tensor, type[, rank]) is quantized only once."""
    plan.check(ir)
    if plan.quantizer == "gptq" or any(c.rank for c in plan.tensors.values()):
        if stats is None:
            raise EdgeqError("quantizing with GPTQ / compensation needs calibration statistics")
    linears = dict(ir.linears)
    names = [n for n in plan.tensors if n in linears]
    it = names
    if progress:
        it = tqdm(names, desc=f"quantizing ({plan.quantizer})", unit="tensor", leave=False)
    cfg = GPTQConfig(damp=plan.damp, act_order=plan.act_order)
    for name in it:
        c = plan.tensors[name]
        lin = linears[name]
        if any(lr.source == COMP_SOURCE for lr in lin.low_rank):
            raise EdgeqError(f"{name} already carries an error-compensation branch (quantized twice?)")
        qt = as_qtype(c.type)
        if FORMATS[qt].block_size == 1:  # F16 / F32: the weight as the file will hold it
            if qt.value == "F16":
                linears[name] = dataclasses.replace(lin, weight=np.asarray(lin.weight, np.float32).astype(np.float16)
                                                    .astype(np.float32), packed=None)
            continue
        codec = codec_for(qt)
        cov = None if stats is None else stats.layers[lin.layer].input_cov(lin.role)
        w = np.asarray(lin.weight, dtype=np.float32)
        key = (name, qt.value, plan.quantizer, plan.damp, plan.act_order)
        if cache is not None and key in cache:
            deq, data = cache[key]
        else:
            if plan.quantizer == "gptq":
                res = gptq(w, cov, codec, cfg)
            else:
                res = rtn(w, codec, None if cov is None else np.diag(cov))
            deq, data = res.dequant, pack_gguf(res, codec)
            if cache is not None:
                cache[key] = (deq, data)
        low_rank = lin.low_rank
        if c.rank:
            ckey = key + (c.rank, plan.compensation)
            if cache is not None and ckey in cache:
                a, b = cache[ckey]
            else:
                a, b = compensation(w - deq, cov, c.rank, plan.compensation)
                if cache is not None:
                    cache[ckey] = (a, b)
            low_rank = low_rank + (LowRank(a=a, b=b, scale=1.0, source=COMP_SOURCE),)
        # the dequantized weight and the packed bytes are parked on disk inside edgeq.spill.spilling
        linears[name] = dataclasses.replace(lin, weight=spill(deq), low_rank=low_rank,
                                            packed=Packed(qt.value, spill_array(data)))
    rec = PassRecord(name="quantize", options={"quantizer": plan.quantizer, "compensation": plan.compensation,
                                               "damp": plan.damp, "act_order": plan.act_order})
    return ir.replace(linears=linears, history=ir.history + (rec,))


def has_compensation(ir: ModelIR) -> bool:
    return any(lr.source == COMP_SOURCE for lin in ir.linears.values() for lr in lin.low_rank)


"""Apply a :class:`edgeq.plan.Plan` to a ModelIR: grid-exact quantization + error compensation.

For every block linear whose planned type is quantized: GPTQ (or RTN) on the calibration
covariance of its input gives codes on the type's grid; the linear then carries them packed
(``Linear.packed``, written as is by the GGUF lowering) and its ``weight`` becomes exactly the
dequantized values, so every runtime (reference included) sees what the artifact holds. With
``rank > 0`` a compensation branch (``LowRank``, source ``"qerr"``, fp16 values) fitted to the
error ``W - Q(W)`` is attached (QERA's activation-aware closed form, or plain SVD).
Each linear's work is :mod:`edgeq.quant.linear_task`'s (one self-contained job per linear): here,
one after another, or a layer's linears at a time as tasks of an executor (``runner``).

Embedding / output head (and linears planned as F16/F32) are left as float tensors; the lowering
quantizes them round-to-nearest in their planned type (bit-exact with llama.cpp for the legacy
types).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from tqdm import tqdm

from edgeq.errors import EdgeqError
from edgeq.ir import LowRank, ModelIR, Packed, PassRecord
from edgeq.quant.formats import FORMATS, as_qtype
from edgeq.quant.linear_task import LinearJob, compensate_linear, quantize_linear
from edgeq.spill import spill, spill_array

COMP_SOURCE = "qerr"


def quantize_ir(ir: ModelIR, plan, stats, progress: bool = True, cache: dict | None = None,
                runner: Callable | None = None) -> ModelIR:
    """A new ModelIR with the plan's quantization applied to every block linear.

    ``cache``: a dict reused across calls on the *same* IR and statistics (e.g. several plans
    of one model in a benchmark) so each (tensor, type[, rank]) is quantized only once.

    ``runner``: run a layer's linears as independent tasks (``edgeq.pipeline.split``): called
    once per layer with that layer's ``[(LinearJob, weight, covariance)]``, it returns their
    :class:`~edgeq.quant.linear_task.LinearResult` in order. The bytes are the same as without
    it (the same :func:`~edgeq.quant.linear_task.run_linear`, one linear after another here)."""
    plan.check(ir)
    if plan.quantizer == "gptq" or any(c.rank for c in plan.tensors.values()):
        if stats is None:
            raise EdgeqError("quantizing with GPTQ / compensation needs calibration statistics")
    if runner is not None and cache is not None:
        raise ValueError("quantize_ir: a cache and a runner do not go together")
    linears = dict(ir.linears)
    ordered: list[tuple[LinearJob, str]] = []  # the block-quantized linears, in plan order
    for name in (n for n in plan.tensors if n in linears):
        c, lin = plan.tensors[name], linears[name]
        if any(lr.source == COMP_SOURCE for lr in lin.low_rank):
            raise EdgeqError(f"{name} already carries an error-compensation branch (quantized twice?)")
        qt = as_qtype(c.type)
        if FORMATS[qt].block_size == 1:  # F16 / F32: the weight as the file will hold it
            if qt.value == "F16":
                linears[name] = dataclasses.replace(lin, weight=np.asarray(lin.weight, np.float32).astype(np.float16)
                                                    .astype(np.float32), packed=None)
            continue
        job = LinearJob(name=name, qtype=qt.value, quantizer=plan.quantizer, damp=plan.damp, act_order=plan.act_order,
                        rank=int(c.rank or 0), compensation=plan.compensation)
        ordered.append((job, name))

    def cov_of(name):
        lin = linears[name]
        return None if stats is None else stats.layers[lin.layer].input_cov(lin.role)

    def place(name, job, deq, data, low_rank) -> None:
        lin = linears[name]
        lrs = lin.low_rank if low_rank is None else lin.low_rank + (LowRank(a=low_rank[0], b=low_rank[1], scale=1.0,
                                                                            source=COMP_SOURCE),)
        # the dequantized weight and the packed bytes are parked on disk inside edgeq.spill.spilling
        linears[name] = dataclasses.replace(lin, weight=spill(deq), low_rank=lrs,
                                            packed=Packed(job.qtype, spill_array(data)))

    if runner is None:
        it = tqdm(ordered, desc=f"quantizing ({plan.quantizer})", unit="tensor", leave=False) if progress else ordered
        for job, name in it:
            w, cov = np.asarray(linears[name].weight, dtype=np.float32), cov_of(name)
            key = (name, job.qtype, plan.quantizer, plan.damp, plan.act_order)
            if cache is not None and key in cache:
                deq, data = cache[key]
            else:
                deq, data = quantize_linear(job, w, cov)
                if cache is not None:
                    cache[key] = (deq, data)
            low_rank = None
            if job.rank:
                ckey = key + (job.rank, plan.compensation)
                if cache is not None and ckey in cache:
                    low_rank = cache[ckey]
                else:
                    low_rank = compensate_linear(job, w, deq, cov)
                    if cache is not None:
                        cache[ckey] = low_rank
            place(name, job, deq, data, low_rank)
    else:
        layers: dict[int, list[tuple[LinearJob, str]]] = {}  # layer -> its jobs, one runner call each
        for job, name in ordered:
            layers.setdefault(linears[name].layer, []).append((job, name))
        order = sorted(layers)
        it = tqdm(order, desc=f"quantizing ({plan.quantizer}, tasks per linear)", unit="layer", leave=False) \
            if progress else order
        for layer in it:
            jobs = layers[layer]
            results = runner([(job, linears[name].weight, cov_of(name)) for job, name in jobs])
            if len(results) != len(jobs):
                raise EdgeqError(f"layer {layer}: {len(results)} results for {len(jobs)} linears")
            for (job, name), res in zip(jobs, results):
                place(name, job, res.dequant, res.packed, res.low_rank)
    rec = PassRecord(name="quantize", options={"quantizer": plan.quantizer, "compensation": plan.compensation,
                                               "damp": plan.damp, "act_order": plan.act_order})
    return ir.replace(linears=linears, history=ir.history + (rec,))


def has_compensation(ir: ModelIR) -> bool:
    return any(lr.source == COMP_SOURCE for lin in ir.linears.values() for lr in lin.low_rank)


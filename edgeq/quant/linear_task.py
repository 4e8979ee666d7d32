"""One linear's quantization as a self-contained task: GPTQ (or RTN) on the planned type's grid,
then the error-compensation branch where the plan gives it a rank.

A :class:`LinearJob` says what to do (a few strings and numbers); :func:`run_linear` does it from
the linear's weight (out x in, float32) and the input covariance of its calibration activations
(in x in, float64). Nothing else of the model is needed, so the linears of a layer can run as
independent tasks anywhere (``edgeq.pipeline.split``) and give the same bytes as one after
another in this process (:func:`edgeq.quant.apply.quantize_ir` runs the same function).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgeq.quant.codecs import codec_for
from edgeq.quant.compensate import compensation
from edgeq.quant.formats import as_qtype
from edgeq.quant.gptq import GPTQConfig, gptq, pack_gguf, rtn


@dataclass(frozen=True)
class LinearJob:
    """What to do with one linear (picklable and small: it travels with every task)."""

    name: str
    qtype: str  # a block-quantized type (Q4_K, ...); F16/F32 never become jobs
    quantizer: str  # gptq | rtn
    damp: float
    act_order: bool
    rank: int = 0  # compensation rank (0: none)
    compensation: str = "qera"


@dataclass
class LinearResult:
    dequant: np.ndarray  # (out, in) float32: exactly what a runtime decodes
    packed: np.ndarray  # (out, row bytes) uint8: the GGML blocks
    low_rank: tuple[np.ndarray, np.ndarray] | None  # (A, B) float32 holding fp16 values, or None
    cpu_s: float = 0.0  # CPU seconds the job took where it ran (its process's, all threads)

    @property
    def nbytes(self) -> int:
        return self.dequant.nbytes + self.packed.nbytes + sum(x.nbytes for x in self.low_rank or ())


def quantize_linear(job: LinearJob, w: np.ndarray, cov: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized weight, packed bytes) of ``w`` on the job's grid."""
    codec = codec_for(as_qtype(job.qtype))
    w = np.asarray(w, dtype=np.float32)
    if job.quantizer == "gptq":
        res = gptq(w, cov, codec, GPTQConfig(damp=job.damp, act_order=job.act_order))
    else:
        res = rtn(w, codec, None if cov is None else np.diag(cov))
    return res.dequant, pack_gguf(res, codec)


def compensate_linear(job: LinearJob, w: np.ndarray, deq: np.ndarray, cov: np.ndarray | None):
    """(A, B) of the compensation branch fitted to ``w - deq`` (the job must have a rank)."""
    return compensation(np.asarray(w, dtype=np.float32) - deq, cov, job.rank, job.compensation)


def run_linear(job: LinearJob, w: np.ndarray, cov: np.ndarray | None) -> LinearResult:
    """The whole job: quantization, then compensation where ``job.rank`` > 0."""
    t = time.process_time()
    w = np.asarray(w, dtype=np.float32)
    cov = None if cov is None else np.asarray(cov, dtype=np.float64)
    deq, packed = quantize_linear(job, w, cov)
    low_rank = compensate_linear(job, w, deq, cov) if job.rank else None
    return LinearResult(deq, packed, low_rank, time.process_time() - t)

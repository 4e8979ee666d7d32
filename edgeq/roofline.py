"""Roofline predictions of decode / prefill speed from an artifact's bytes and FLOPs per token.

Per token a decoder-only model reads every weight it runs once (decode: one token per pass over
the weights) plus the cached K/V of every earlier position, and does ~2 FLOPs per weight it
multiplies plus the attention's ~4·heads·head_dim FLOPs per cached position. A device with memory
bandwidth B and peak throughput P then decodes at most ``min(B / bytes, P / flops)`` tokens/s;
a prompt of n tokens reads the weights once for all n, so prefill is bounded by
``min(n · B / bytes, P / flops)`` — compute-bound for any real prompt.

* :func:`token_cost` — bytes and FLOPs per token of a model (hparams + the weight bytes a token
  actually reads, e.g. a pruning rate's prefix).
* :func:`predict` — the two bounds and which one binds, for one (bandwidth, peak) pair.
* :func:`compute_peak` — the peak a runtime can use on a profile (int8 dot products for
  llama.cpp / onnxruntime int weights, fp32 for the float kernels of TVM and the reference
  runtime; fp16 on GPUs).
* :func:`for_profiles` — every hardware profile in targets/.
* :func:`measure_host` — this machine's read bandwidth and fp32 matmul throughput (numpy), the
  "device" for comparing predictions with measured speed.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from edgeq.backends import int8_runtimes
from edgeq.ir import HParams
from edgeq.targets import list_targets


@dataclass(frozen=True)
class TokenCost:
    weight_bytes: int  # weights one decode token reads
    kv_bytes_per_position: int  # K and V of one cached position, all layers
    flops: float  # matmul FLOPs per token (2 per weight), attention excluded
    attention_flops_per_position: float  # QKᵀ and AV per cached position, all layers

    def decode(self, context: int) -> tuple[float, float]:
        """(bytes, FLOPs) of one decode step with ``context`` cached positions."""
        return (self.weight_bytes + self.kv_bytes_per_position * context,
                self.flops + self.attention_flops_per_position * context)

    def to_json(self) -> dict:
        return asdict(self)


def matmul_params(hp: HParams) -> int:
    """Weights multiplied per token: the block linears and the output head (not the embedding
    lookup, which reads one row)."""
    h, f, d = hp.hidden_size, hp.intermediate_size, hp.head_dim
    per_layer = h * (hp.num_heads + 2 * hp.num_kv_heads) * d + hp.num_heads * d * h + 3 * h * f
    return hp.num_layers * per_layer + hp.vocab_size * h


def token_cost(hp: HParams, weight_bytes: int, kv_bytes_per_value: int = 4, matmul_fraction: float = 1.0
               ) -> TokenCost:
    """``matmul_fraction``: the share of the matmul weights a token runs (a pruning rate's
    ``weight_bytes`` ratio to rate 0, applied to the FLOPs)."""
    kv = 2 * hp.num_layers * hp.num_kv_heads * hp.head_dim * kv_bytes_per_value
    attn = 4.0 * hp.num_layers * hp.num_heads * hp.head_dim
    return TokenCost(weight_bytes=int(weight_bytes), kv_bytes_per_position=kv,
                     flops=2.0 * matmul_params(hp) * matmul_fraction, attention_flops_per_position=attn)


def predict(cost: TokenCost, bandwidth_gb_s: float, peak_tflops: float, context: int = 256,
            prompt: int = 512) -> dict:
    """Decode at ``context`` cached positions and prefill of a ``prompt``-token prompt."""
    b, f = cost.decode(context)
    mem = bandwidth_gb_s * 1e9 / b
    comp = peak_tflops * 1e12 / f
    pf = cost.flops + cost.attention_flops_per_position * prompt / 2  # mean context over the prompt
    p_mem = prompt * bandwidth_gb_s * 1e9 / (cost.weight_bytes + cost.kv_bytes_per_position * prompt)
    p_comp = peak_tflops * 1e12 / pf
    return {"decode_tok_s": min(mem, comp), "decode_bound": "memory" if mem <= comp else "compute",
            "decode_memory_tok_s": mem, "decode_compute_tok_s": comp,
            "prefill_tok_s": min(p_mem, p_comp), "prefill_bound": "memory" if p_mem <= p_comp else "compute",
            "context": context, "prompt": prompt, "bandwidth_gb_s": bandwidth_gb_s, "peak_tflops": peak_tflops}


INT_RUNTIMES = int8_runtimes()  # quantized weights through int8 dot products (llamacpp, onnxruntime)


def compute_peak(profile, runtime: str, weight_type: str | None) -> tuple[float, str]:
    """(TFLOPS or TOPS, which peak) a runtime can use on ``profile``."""
    gpu = profile.kind.value == "gpu"
    quantized = weight_type not in (None, "F32", "F16")
    if gpu and profile.peak_fp16_tflops:
        return float(profile.peak_fp16_tflops), "fp16"
    if quantized and runtime in INT_RUNTIMES and profile.peak_int8_tops:
        return float(profile.peak_int8_tops), "int8"
    return float(profile.peak_fp32_tflops), "fp32"


def for_profiles(cost: TokenCost, runtime: str, weight_type: str | None, context: int = 256,
                 prompt: int = 512, profiles=None) -> list[dict]:
    rows = []
    for p in profiles if profiles is not None else list_targets():
        peak, which = compute_peak(p, runtime, weight_type)
        row = {"profile": p.name, "device": p.reference_device, "peak_kind": which}
        row.update(predict(cost, p.bandwidth_gb_s, peak, context, prompt))
        row["fits_memory_budget"] = cost.weight_bytes <= p.memory_budget_bytes
        rows.append(row)
    return rows


_HOST: dict = {}


def measure_host(seconds: float = 1.0, threads: int | None = None, fresh: bool = False) -> dict:
    """This machine: read bandwidth (sum over a 256 MiB array, the decode access pattern) and fp32
    matmul throughput (numpy 1024x1024, BLAS threads as configured); medians. Measured once per
    process (one report compares every artifact against the same roofline) unless ``fresh``."""
    if _HOST and not fresh:
        return dict(_HOST)
    a = np.ones(32 << 20, np.float64)  # 256 MiB
    ts = []
    t_end = time.perf_counter() + seconds / 2
    while len(ts) < 3 or time.perf_counter() < t_end:
        t = time.perf_counter()
        a.sum()
        ts.append(time.perf_counter() - t)
    bw = a.nbytes / statistics.median(ts) / 1e9
    m = np.ones((1024, 1024), np.float32)
    ts = []
    t_end = time.perf_counter() + seconds / 2
    while len(ts) < 3 or time.perf_counter() < t_end:
        t = time.perf_counter()
        m @ m
        ts.append(time.perf_counter() - t)
    flops = 2 * 1024 ** 3 / statistics.median(ts)
    _HOST.update(read_bandwidth_gb_s=bw, fp32_matmul_tflops=flops / 1e12)
    return dict(_HOST)

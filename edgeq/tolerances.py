"""Named accuracy tolerances (no magic numbers in tests or in verify).

Two kinds of check:

* **regression**: the artifact rerun now vs the goldens it recorded at build time. The same
  runtime on the same files is deterministic, so the bound only absorbs thread-count and
  CPU-kernel differences between machines.
* **reference**: the artifact vs the fp32 reference (adapters applied) at build time, i.e. how
  much accuracy the format loses. Bounds depend on the weight format of the block linears.
  KL is the top-k truncated KL(ref || artifact) per position (see edgeq.goldens).
"""
from __future__ import annotations

from dataclasses import dataclass

REGRESSION_MAX_LOGPROB_DIFF = 2e-3
REGRESSION_MIN_TOP1 = 1.0


@dataclass(frozen=True)
class ReferenceTolerance:
    max_mean_kl: float
    min_top1: float


REFERENCE_TOLERANCE: dict[str, ReferenceTolerance] = {
    "F32": ReferenceTolerance(max_mean_kl=1e-4, min_top1=0.99),
    "F16": ReferenceTolerance(max_mean_kl=1e-3, min_top1=0.97),
    "Q8_0": ReferenceTolerance(max_mean_kl=0.01, min_top1=0.90),
    "Q4_1": ReferenceTolerance(max_mean_kl=0.15, min_top1=0.70),
    "Q4_0": ReferenceTolerance(max_mean_kl=0.50, min_top1=0.60),
    # Formats the planner adds. A planned artifact is checked against the bound of the
    # lowest-bit type among its block linears (a conservative bound for a mix). Set between the
    # measured neighbours above (Q6_K/Q5_x: at most Q4_1's; Q4_K: Q4_0's), not measured alone.
    "Q6_K": ReferenceTolerance(max_mean_kl=0.05, min_top1=0.85),
    "Q5_1": ReferenceTolerance(max_mean_kl=0.15, min_top1=0.70),
    "Q5_0": ReferenceTolerance(max_mean_kl=0.15, min_top1=0.70),
    "Q4_K": ReferenceTolerance(max_mean_kl=0.50, min_top1=0.60),
    # ONNX MatMulNBits group formats (edgeq.quant.intgroup, symmetric): the same grids as Q8_0 /
    # Q4_0 (one fp16 scale per 32 weights, Q4_0's scale rule), so the same bounds.
    "INT8": ReferenceTolerance(max_mean_kl=0.01, min_top1=0.90),
    "INT4": ReferenceTolerance(max_mean_kl=0.50, min_top1=0.60),
}
# Measured on SmolLM2-135M-Instruct's golden prompts (96 positions) for files byte-identical to
# llama.cpp's own quantization: Q8_0 KL 0.0054 / top-1 0.98; Q4_1 0.0037 / 0.99 (the model sits
# on a Q4_1 grid); Q4_0 0.32 / 0.71 (Q4_0 is a poor format for this model: ppl 22.0 -> 28.2).
# The bounds leave ~1.5x headroom over that format loss; a broken lowering (wrong RoPE
# permutation, swapped tensors) gives KL of several nats.

# GGUF round trip on the Q8_0 artifact: llama.cpp vs the reference runtime on the same
# dequantized weights. llama.cpp also quantizes *activations* to Q8_0 inside its Q8_0 dot
# products (and keeps an F16 KV cache), so logits differ by up to ~1 (SmolLM2: max |diff| 0.99,
# mean KL 0.0029, top-1 0.97-1.0 measured); the bounds are on the distributions.
GGUF_Q8_MAX_MEAN_KL = 0.01
GGUF_Q8_MIN_TOP1 = 0.9

# ONNX round trip on the int8 artifact: onnxruntime (MatMulNBits accuracy_level 4 quantizes
# activations to int8 per block, as llama.cpp's Q8_0 dot products do) vs the reference runtime on
# the same dequantized weights. Measured on SmolLM2: mean KL 3.0e-3 on 2048 wikitext positions
# (llama.cpp's own Q8_0 round trip: 3.0e-3), 3.4e-3 on the e2e test's prompt; so issue 5's goal
# of KL < 1e-3 is missed (accuracy_level 1 would be exact but runs 8-bit MatMulNBits at 1.3 tok/s,
# a dequantizing fallback). The bound is the GGUF Q8 one.
ONNX_INT8_MAX_MEAN_KL = 0.01

# A sorting pass is an exact reparametrisation at rate 0:
# max |logits(sorted) - logits(original)| / max |logits(original)|, fp32 reference runtime.
SORT_EXACT_MAX_REL = 1e-4

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

# The reference check uses three measures, so that its bounds mean something for any model, from
# a confident real one (SmolLM2) to a small random one whose next-token distributions are
# near-flat (where top-1 agreement over all positions is a coin toss and every KL is tiny):
#
# * mean KL (absolute, nats): the format loss on a real model;
# * relative KL = mean KL(ref || artifact) / mean KL(ref || uniform), both top-k truncated: the
#   share of what the reference distributions say that the artifact loses. Scale-free: measured
#   on tiny random Llamas (logit spreads from near-flat to O(1)) a correct build loses 0.0002-0.005
#   (Q8_0 / int8), 0.005-0.08 (Q5_0), 0.01-0.23 (Q4_0 / Q4_1 / int4), while an artifact of another
#   model of the same shapes (right format, wrong weights) loses 1.0-1.23;
# * top-1 agreement counted only at positions where the reference's top-1 log-prob beats its
#   top-2 by at least TOP1_CLEAR_MARGIN nats, and only when at least TOP1_MIN_CLEAR_POSITIONS
#   positions are that clear (a near tie flips under any rounding; a random tiny model has 0-3
#   clear positions out of 96, SmolLM2 most of them).
TOP1_CLEAR_MARGIN = 1.0
TOP1_MIN_CLEAR_POSITIONS = 16
# A model whose correct build fails the bounds below (edgeq.reference_check): the artifact may
# lose at most FLOOR_HEADROOM x what plain rounding to its format loses on the model in the
# reference runtime (its "floor"; the runtimes' own arithmetic — llama.cpp's 8-bit activations —
# adds to the rounding), with top-1 at clear positions at most FLOOR_TOP1_SLACK below the floor's.
# An artifact of another model of the same shapes loses relative KL 1.0-1.23 (measured, see
# below): where FLOOR_HEADROOM x the floor reaches UNRELATED_MIN_RELATIVE_KL the check cannot
# separate the two and is reported inconclusive.
FLOOR_HEADROOM = 1.5
FLOOR_TOP1_SLACK = 0.1
UNRELATED_MIN_RELATIVE_KL = 0.9


@dataclass(frozen=True)
class ReferenceTolerance:
    max_mean_kl: float
    min_top1: float  # at clear positions (see TOP1_CLEAR_MARGIN)
    max_relative_kl: float


REFERENCE_TOLERANCE: dict[str, ReferenceTolerance] = {
    "F32": ReferenceTolerance(max_mean_kl=1e-4, min_top1=0.99, max_relative_kl=0.01),
    "F16": ReferenceTolerance(max_mean_kl=1e-3, min_top1=0.97, max_relative_kl=0.01),
    "Q8_0": ReferenceTolerance(max_mean_kl=0.01, min_top1=0.90, max_relative_kl=0.05),
    "Q4_1": ReferenceTolerance(max_mean_kl=0.15, min_top1=0.70, max_relative_kl=0.5),
    "Q4_0": ReferenceTolerance(max_mean_kl=0.50, min_top1=0.60, max_relative_kl=0.5),
    # Formats the planner adds. A planned artifact is checked against the bound of the
    # lowest-bit type among its block linears (a conservative bound for a mix). Set between the
    # measured neighbours above (Q6_K/Q5_x: at most Q4_1's; Q4_K: Q4_0's), not measured alone.
    "Q6_K": ReferenceTolerance(max_mean_kl=0.05, min_top1=0.85, max_relative_kl=0.2),
    "Q5_1": ReferenceTolerance(max_mean_kl=0.15, min_top1=0.70, max_relative_kl=0.3),
    "Q5_0": ReferenceTolerance(max_mean_kl=0.15, min_top1=0.70, max_relative_kl=0.3),
    "Q4_K": ReferenceTolerance(max_mean_kl=0.50, min_top1=0.60, max_relative_kl=0.5),
    # ONNX MatMulNBits group formats (edgeq.quant.intgroup, symmetric): the same grids as Q8_0 /
    # Q4_0 (one fp16 scale per 32 weights, Q4_0's scale rule), so the same bounds.
    "INT8": ReferenceTolerance(max_mean_kl=0.01, min_top1=0.90, max_relative_kl=0.05),
    "INT4": ReferenceTolerance(max_mean_kl=0.50, min_top1=0.60, max_relative_kl=0.5),
}
# Measured on SmolLM2-135M-Instruct's golden prompts (96 positions) for files byte-identical to
# llama.cpp's own quantization: Q8_0 KL 0.0054 / top-1 0.98; Q4_1 0.0037 / 0.99 (the model sits
# on a Q4_1 grid); Q4_0 0.32 / 0.71 (Q4_0 is a poor format for this model: ppl 22.0 -> 28.2),
# top-1 there over all positions. With the clear-margin rule (issue 18), `edgeq build --bits 4`
# of SmolLM2: 61 of 96 positions clear, top-1 0.885 there (0.708 over all), relative KL 0.037.
# The bounds leave ~1.5x headroom over that format loss; a broken lowering (wrong RoPE
# permutation, swapped tensors) gives KL of several nats. The relative-KL bounds leave >= 2x
# over the tiny models' worst correct build and sit at <= half of an unrelated model's loss.

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

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
    "Q4_0": ReferenceTolerance(max_mean_kl=0.20, min_top1=0.65),
}

# GGUF round trip on the Q8_0 artifact (tests/lower): llama.cpp vs the reference runtime on
# the same dequantized weights.
GGUF_Q8_MAX_ABS_LOGIT_DIFF = 0.05

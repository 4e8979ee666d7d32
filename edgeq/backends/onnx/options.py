"""How an ONNX graph is built: storage formats and attention form (:class:`OnnxOptions`), and the
pruning rates one graph switches between (its ``rate_index`` input and MLP channel segments)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgeq.errors import EdgeqError
from edgeq.ir import ModelIR

ATTENTION = ("gqa", "standard")
FFN_RATES = ("mask", "segments")


@dataclass(frozen=True)
class OnnxOptions:
    """How weights are stored (int-group format names from edgeq.quant.intgroup, or None for
    float32) and how attention is expressed."""

    linear: str | None = "int4_g32_sym"
    head: str | None = "int8_g32_sym"  # the output head and the (tied or not) embedding table
    accuracy_level: int = 4  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
    # "gqa": com.microsoft.GroupQueryAttention (RoPE, KV-cache append, grouped heads in one node;
    # the Q/K pair sort is undone first, exactly); "standard": plain opset-23 ops with per-KV-group
    # gathered RoPE frequencies (the form pruned Q/K pairs need).
    attention: str = "gqa"
    max_positions: int = 32768  # GQA cos/sin cache rows (capped by the model's max positions)
    # multi-rate graphs: "mask": full-width MLP matmuls, the pruned channels zeroed (rate 0 as fast
    # as a 1-rate graph); "segments": MLP split at the kept widths behind If nodes (a rate reads
    # only its weights, at the cost of more, smaller MatMulNBits calls)
    ffn_rates: str = "mask"

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise EdgeqError(f"unknown onnx attention {self.attention!r} (available: {', '.join(ATTENTION)})")
        if self.ffn_rates not in FFN_RATES:
            raise EdgeqError(f"unknown onnx ffn_rates {self.ffn_rates!r} (available: {', '.join(FFN_RATES)})")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)



RATE_INPUT = "rate_index"  # int64 scalar: index into the artifact's pruning rates (multi-rate graphs only)


def graph_rates(ir: ModelIR) -> tuple[float, ...] | None:
    """The pruning rates a graph of ``ir`` switches between (None: one rate, no rate input)."""
    return tuple(ir.prune.rates) if ir.prune is not None and len(ir.prune.rates) > 1 else None


def ffn_segments(ir: ModelIR, layer: int, ffn_rates: str = "segments") -> list[tuple[int, int]]:
    """MLP channel segments ``[lo, hi)`` of one layer, each one MatMulNBits call per matmul. With
    ``ffn_rates="segments"``, split at every kept width a rate uses: the first is always computed,
    segment ``[lo, hi)`` only at rates keeping ``hi`` channels or more; with ``"mask"``, one."""
    F = ir.hparams.intermediate_size
    rates = graph_rates(ir)
    if rates is None or ffn_rates == "mask":
        return [(0, F)]
    ends = sorted({ir.prune.widths[r][layer].ffn for r in rates} | {F})
    return list(zip([0] + ends[:-1], ends))


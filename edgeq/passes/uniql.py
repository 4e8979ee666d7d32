"""All three UniQL sorts (MLP channels, Q/K RoPE pairs, V/O whitened SVD) from one calibration.

The three passes touch disjoint dimensions (MLP channels; Q/K head dims; V head dims) and none
changes any layer's inputs or outputs, so one set of statistics serves all three. The history
gets the three passes' own records (sort_mlp, sort_qk, svd_vo).
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeq.ir import ModelIR
from edgeq.passes import register, require_stats, run_pass
from edgeq.passes.sort_mlp import SortMLPConfig
from edgeq.passes.sort_qk import SortQKConfig
from edgeq.passes.svd_vo import SVDVOConfig


@dataclass(frozen=True)
class UniQLSortConfig:
    lam: float = 1.0
    damp: float = 1e-6
    lam_relative: bool = False
    fold_v_bias: bool = True

    def parts(self) -> tuple[object, ...]:
        return (SortMLPConfig(lam=self.lam, lam_relative=self.lam_relative), SortQKConfig(),
                SVDVOConfig(damp=self.damp, fold_v_bias=self.fold_v_bias))


@register(UniQLSortConfig)
def uniql_sort(ir: ModelIR, config: UniQLSortConfig, stats) -> ModelIR:
    require_stats(ir, stats, "uniql_sort")
    for part in config.parts():
        ir = run_pass(ir, part, stats)
    return ir

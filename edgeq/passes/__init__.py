"""Passes: pure functions ``ModelIR -> ModelIR``, each selected by its frozen config dataclass.

A pass module defines ``@dataclass(frozen=True) class XConfig`` and a function decorated with
``@register(XConfig)`` taking ``(ir, config, stats)``; :func:`run_pass` dispatches on
``type(config)``. The registry is an explicit dict; registering a config type twice is an
error. Pass modules are imported explicitly at the bottom of this file (no discovery).

Every pass leaves its input untouched, appends a :class:`~edgeq.ir.PassRecord` to
``ir.history`` and returns a new ModelIR.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.ir import Linear, ModelIR, PassRecord
from edgeq.spill import spill

if TYPE_CHECKING:  # pragma: no cover
    from edgeq.calibrate import CalibStats

PassFn = Callable[[ModelIR, Any, "CalibStats | None"], ModelIR]
_REGISTRY: dict[type, PassFn] = {}


def register(config_type: type) -> Callable[[PassFn], PassFn]:
    """Decorator: make ``fn`` the pass for configs of ``config_type`` (a frozen dataclass)."""
    if not (dataclasses.is_dataclass(config_type) and config_type.__dataclass_params__.frozen):
        raise EdgeqError(f"pass config {config_type.__name__} must be a frozen dataclass")

    def deco(fn: PassFn) -> PassFn:
        if config_type in _REGISTRY:
            raise EdgeqError(f"a pass is already registered for {config_type.__name__} "
                             f"({_REGISTRY[config_type].__module__}.{_REGISTRY[config_type].__name__})")
        _REGISTRY[config_type] = fn
        return fn

    return deco


def registered() -> dict[type, PassFn]:
    return dict(_REGISTRY)


def run_pass(ir: ModelIR, config: Any, stats: "CalibStats | None" = None) -> ModelIR:
    fn = _REGISTRY.get(type(config))
    if fn is None:
        raise EdgeqError(f"no pass registered for {type(config).__name__} "
                         f"(known: {', '.join(sorted(t.__name__ for t in _REGISTRY))})")
    return fn(ir, config, stats)


# ---- helpers shared by pass implementations ---------------------------------------------------

def require_stats(ir: ModelIR, stats: "CalibStats | None", pass_name: str) -> "CalibStats":
    """Check that ``stats`` fit ``ir`` and were not collected before ``pass_name`` last ran on it."""
    if stats is None:
        raise EdgeqError(f"{pass_name} needs calibration statistics (edgeq.calibrate.calibrate)")
    hp = ir.hparams
    if len(stats.layers) != hp.num_layers:
        raise EdgeqError(f"{pass_name}: statistics for {len(stats.layers)} layers, model has {hp.num_layers}")
    want = {"mlp_zz": (hp.intermediate_size,) * 2, "attn_xx": (hp.hidden_size,) * 2,
            "q_diag": (hp.num_heads, hp.head_dim), "k_diag": (hp.num_kv_heads, hp.head_dim)}
    for i, L in enumerate(stats.layers):
        for name, shape in want.items():
            got = tuple(np.shape(getattr(L, name)))
            if got != shape:
                raise EdgeqError(f"{pass_name}: layer {i} {name}: expected shape {shape}, got {got}")
    cal = stats.source.get("history")
    hist = [r.name for r in ir.history]
    if isinstance(cal, list) and hist[:len(cal)] == cal and pass_name in hist[len(cal):]:
        raise EdgeqError(f"{pass_name}: the statistics were collected before {pass_name} already ran on this "
                         "model (its layout changed since); recalibrate")
    return stats


def record(ir: ModelIR, name: str, config: Any, stats: "CalibStats | None", **extra) -> PassRecord:
    opts: dict[str, object] = dataclasses.asdict(config)
    if stats is not None:
        opts["calibration"] = {"n_samples": stats.n_samples, "seq_len": stats.seq_len}
    opts.update(extra)
    return PassRecord(name, opts)


def _f(a: np.ndarray, fn) -> np.ndarray:
    """``fn`` applied in float64, back in ``a``'s dtype (parked on disk inside ``edgeq.spill.spilling``)."""
    return spill(np.ascontiguousarray(fn(a.astype(np.float64)), dtype=a.dtype))


def map_out(lin: Linear, fn: Callable[[np.ndarray], np.ndarray]) -> Linear:
    """Apply ``fn`` (acting on axis 0, the output rows) to the weight, the bias and every
    low-rank ``B`` -- i.e. ``y -> fn(y)`` for the layer's output. Computed in float64."""
    return dataclasses.replace(
        lin, weight=_f(lin.weight, fn), bias=None if lin.bias is None else _f(lin.bias, fn),
        low_rank=tuple(dataclasses.replace(lr, b=_f(lr.b, fn)) for lr in lin.low_rank))


def map_in(lin: Linear, fn: Callable[[np.ndarray], np.ndarray]) -> Linear:
    """Apply ``fn`` (acting on axis 1, the input columns) to the weight and every low-rank ``A``."""
    return dataclasses.replace(lin, weight=_f(lin.weight, fn),
                               low_rank=tuple(dataclasses.replace(lr, a=_f(lr.a, fn)) for lr in lin.low_rank))


def effective_weight(lin: Linear) -> np.ndarray:
    """float64 ``W + sum(scale * B @ A)`` over the low-rank branches."""
    w = lin.weight.astype(np.float64)
    for lr in lin.low_rank:
        w = w + lr.scale * (lr.b.astype(np.float64) @ lr.a.astype(np.float64))
    return w


__all__ = ["register", "registered", "run_pass"]

# Explicit list of pass modules (each registers its config type on import).
from edgeq.passes import sort_flap, sort_mlp, sort_qk, svd_vo, uniql  # noqa: E402,F401

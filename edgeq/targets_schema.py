"""The target profile file's schema (:data:`SCHEMA`: the keys each table may hold) and typed,
validated access to its tables (:class:`Reader`: errors name the file and the dotted key)."""
from __future__ import annotations

import math
from enum import Enum
from typing import Any, Mapping

from edgeq.errors import EdgeqError

GIB = 1024**3

SCHEMA: dict[str, set[str]] = {
    "": {"name", "description", "kind", "reference_device", "memory", "peak", "isa", "compile", "deploy", "plan"},
    "plan": {"default_bpw", "ranks"},
    "memory": {"total_gib", "total_bytes", "budget_gib", "budget_bytes", "bandwidth_gb_s"},
    "peak": {"fp32_tflops", "fp16_tflops", "int8_tops", "int4_tops"},
    "isa": {"features"},
    "compile": {"tvm_target"},
    "compile.tvm_target": {"kind", "mtriple", "mcpu", "mattr", "arch"},
    "deploy": {"formats", "quant_types", "default_bits", "quant_block_size", "prune_granularity", "threads",
               "onnx_accuracy_level", "tvm_activations"},
}

_MISSING = object()


class Reader:
    """Typed access to one TOML table, with errors naming the file and the dotted key."""

    def __init__(self, where: str, table: Mapping[str, Any], prefix: str = ""):
        self.where = where
        self.table = table
        self.prefix = prefix
        allowed = SCHEMA.get(prefix.rstrip("."), set())
        extra = sorted(set(table) - allowed)
        if extra:
            raise self.error(f"unknown field '{self.prefix}{extra[0]}'")

    def error(self, msg: str) -> EdgeqError:
        return EdgeqError(f"{self.where}: {msg}")

    def key(self, k: str) -> str:
        return f"{self.prefix}{k}"

    def raw(self, k: str, required: bool = True) -> Any:
        v = self.table.get(k, _MISSING)
        if v is _MISSING and required:
            raise self.error(f"missing field '{self.key(k)}'")
        return None if v is _MISSING else v

    def sub(self, k: str) -> "Reader":
        v = self.raw(k)
        if not isinstance(v, dict):
            raise self.error(f"'{self.key(k)}' must be a table, got {show(v)}")
        return Reader(self.where, v, f"{self.key(k)}.")

    def string(self, k: str, required: bool = True) -> str | None:
        v = self.raw(k, required)
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip():
            raise self.error(f"'{self.key(k)}' must be a non-empty string, got {show(v)}")
        return v

    def number(self, k: str, required: bool = True) -> float | None:
        v = self.raw(k, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise self.error(f"'{self.key(k)}' must be a positive number, got {show(v)}")
        return float(v)

    def integer(self, k: str, required: bool = True) -> int | None:
        v = self.raw(k, required)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self.error(f"'{self.key(k)}' must be a positive integer, got {show(v)}")
        return v

    def strings(self, k: str, required: bool = True) -> tuple[str, ...]:
        v = self.raw(k, required)
        if v is None:
            return ()
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
            raise self.error(f"'{self.key(k)}' must be a non-empty list of strings, got {show(v)}")
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise self.error(f"'{self.key(k)}' lists {dup[0]!r} twice")
        return tuple(v)

    def bytes_(self, stem: str) -> int:
        """``<stem>_gib`` or ``<stem>_bytes`` (exactly one), as bytes."""
        gib, nbytes = self.table.get(f"{stem}_gib"), self.table.get(f"{stem}_bytes")
        if gib is not None and nbytes is not None:
            raise self.error(f"give one of '{self.key(stem + '_gib')}' and '{self.key(stem + '_bytes')}', not both")
        if nbytes is not None:
            return int(self.integer(f"{stem}_bytes"))
        if gib is None:
            raise self.error(f"missing field '{self.key(stem + '_gib')}' (or '{self.key(stem + '_bytes')}')")
        return int(round(self.number(f"{stem}_gib") * GIB))


def show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def enum_value(r: Reader, k: str, enum: type[Enum], value: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise r.error(f"'{r.key(k)}' must be one of {choices}, got {value!r}") from None

"""Decode-speed cost model for the planner (issue 16, item 4): seconds per token of a plan.

A decode token multiplies every block linear and the output head once (the embedding lookup reads
one row: :func:`matmul_weights`). The model charges each such tensor ``n x c(type)`` seconds, ``n``
its weight count and ``c`` its storage type's cost per weight, and each compensation branch of
rank ``r`` on an ``out x in`` linear ``call + r x (in + out) x p`` (llama.cpp applies a branch as
two extra small matmuls and an add: a fixed per-call cost ``call`` plus its fp16 factors' bytes).

Two sources, per (profile, backend):

* **measured** — ``speed_costs.json`` beside this module, written by ``tools/bench_speed_costs.py``
  from llama.cpp decode runs on this host: ``c(T)`` comes from whole-model files in type ``T``, so
  the per-token overhead (attention, norms, sampling) is spread over the weights. Sums over a mix
  are then exact for the measured model under the linear model (the overhead's share is the same
  in every mix: the weights of a model add up to the same ``N``), and approximate for others.
* **roofline** — every other profile / backend: ``c(T)`` = the type's bytes per weight over the
  profile's memory bandwidth, a branch's fp16 factors likewise; no per-call cost (none is known
  without a measurement). A pure bytes model: a plan's speed relative to another is their bytes'
  ratio.

The planner compares a plan with the uniform plan of the same size (``--min-speed``), so only the
costs' ratios matter; a host measurement is a proxy for a profile of the same ISA.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from edgeq.errors import EdgeqError
from edgeq.ir import HParams, weight_matrix_shapes
from edgeq.quant import storage

COSTS_FILE = Path(__file__).with_name("speed_costs.json")
BRANCH_BYTES_PER_PARAM = 2  # fp16 factors (the LoRA GGUF's and the planner's choice_bytes)


@dataclass(frozen=True)
class SpeedModel:
    profile: str
    backend: str
    source: str  # "measured" | "roofline"
    seconds_per_weight: Mapping[str, float]
    branch_call_s: float = 0.0
    branch_s_per_param: float = 0.0
    info: Mapping[str, object] = field(default_factory=dict)  # where a measured table came from

    def type_cost(self, qtype: str) -> float:
        c = self.seconds_per_weight.get(qtype)
        if c is None:
            raise EdgeqError(f"speed model {self.profile}/{self.backend} ({self.source}) has no cost for {qtype}")
        return c

    def tensor_seconds(self, shape: tuple[int, int], qtype: str, rank: int, multiplied: bool = True) -> float:
        """Decode seconds per token of one 2-D weight in ``qtype`` with a rank-``rank`` branch;
        ``multiplied`` False for an embedding table that is only looked up (no cost)."""
        s = shape[0] * shape[1] * self.type_cost(qtype) if multiplied else 0.0
        if rank:
            s += self.branch_call_s + rank * (shape[0] + shape[1]) * self.branch_s_per_param
        return s

    def to_json(self) -> dict:
        return {"profile": self.profile, "backend": self.backend, "source": self.source}


def matmul_weights(hp: HParams) -> dict[str, tuple[int, int]]:
    """The 2-D weights a decode token multiplies: the block linears and the output head (the tied
    embedding when there is no separate head)."""
    shapes = weight_matrix_shapes(hp)
    if "output" in shapes:
        shapes.pop("token_embd")
    return shapes


def _bpw(t: storage.StorageType, group: int) -> float:
    return t.bits_per_weight(group if t.block_size is None else None)


def roofline_model(profile: str, backend: str, bandwidth_gb_s: float,
                   types: tuple[str, ...] | None = None, group: int = 32) -> SpeedModel:
    if not bandwidth_gb_s or bandwidth_gb_s <= 0:
        raise EdgeqError(f"profile {profile}: no memory bandwidth for the roofline speed model")
    bw = bandwidth_gb_s * 1e9
    names = types if types is not None else tuple(t.name for t in storage.types())
    return SpeedModel(profile, backend, "roofline",
                      {t: _bpw(storage.get(t), group) / 8 / bw for t in names},
                      0.0, BRANCH_BYTES_PER_PARAM / bw, {"bandwidth_gb_s": bandwidth_gb_s})


def _read(path: Path = COSTS_FILE) -> list[dict]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeqError(f"{path}: cannot read the speed cost table ({exc})") from None
    return list(data.get("tables", []))


def measured_model(profile: str, backend: str, path: Path = COSTS_FILE) -> SpeedModel | None:
    for e in _read(path):
        if e.get("profile") == profile and e.get("backend") == backend:
            info = {k: v for k, v in e.items() if k not in ("seconds_per_weight", "branch_call_s",
                                                              "branch_s_per_param", "raw")}
            return SpeedModel(profile, backend, "measured", dict(e["seconds_per_weight"]),
                              float(e["branch_call_s"]), float(e["branch_s_per_param"]), info)
    return None


def speed_model(profile: str, backend: str, bandwidth_gb_s: float, group: int = 32,
                path: Path = COSTS_FILE) -> SpeedModel:
    """The measured table for (profile, backend) when one is stored, else the roofline's; a
    measured table lacking a type gets it by bytes from its closest measured type."""
    m = measured_model(profile, backend, path)
    if m is None:
        return roofline_model(profile, backend, bandwidth_gb_s, group=group)
    costs = dict(m.seconds_per_weight)
    known = [(_bpw(storage.get(t), group), t) for t in costs]
    for t in storage.types():
        if t.name not in costs and known:
            bpw = _bpw(t, group)
            kb, kt = min(known, key=lambda x: (abs(x[0] - bpw), x[1]))
            costs[t.name] = costs[kt] * bpw / kb
    return SpeedModel(m.profile, m.backend, m.source, costs, m.branch_call_s, m.branch_s_per_param, m.info)


def store_measured(entry: Mapping, path: Path = COSTS_FILE) -> None:
    """Replace the (profile, backend) entry of the table file (sorted, stable JSON)."""
    tables = [e for e in _read(path) if (e.get("profile"), e.get("backend")) != (entry["profile"], entry["backend"])]
    tables.append(dict(entry))
    tables.sort(key=lambda e: (e["profile"], e["backend"]))
    path.write_text(json.dumps({"version": 1, "tables": tables}, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def plan_seconds(hp: HParams, choices: Mapping[str, object], speed: SpeedModel) -> float:
    """Predicted decode seconds per token of ``choices`` (plan tensor name -> object with ``type``
    and ``rank``, e.g. edgeq.plan.Choice)."""
    shapes, mm = weight_matrix_shapes(hp), matmul_weights(hp)
    return sum(speed.tensor_seconds(shapes[n], c.type, c.rank, n in mm) for n, c in choices.items())


def uniform_reference(hp: HParams, types, budget_bytes: int,
                      uniform: Callable[[str], Mapping[str, str]] | None = None) -> tuple[str, dict[str, str]]:
    """The uniform plan of the same size, what ``--min-speed`` is relative to: among the one-type
    builds of the candidate ``types`` valid for this model (``uniform(t)``: the backend's types per
    tensor for base type ``t``, default every tensor in ``t``), the one whose plan bytes are
    nearest ``budget_bytes`` (ties: the smaller); (its base type, its types). Nearest, not "largest
    within": a budget sized from a llama.cpp file minus a few KB of headers still compares with
    that file's recipe."""
    shapes = weight_matrix_shapes(hp)
    found = []
    for t in types:
        try:
            plan = {n: str(x) for n, x in (uniform(t) if uniform else {n: t for n in shapes}).items()}
        except EdgeqError:
            continue
        if set(plan) != set(shapes) or any(shapes[n][1] % (storage.get(x).block_size or 1) for n, x in plan.items()):
            continue
        found.append((sum(storage.get(x).nbytes(shapes[n]) for n, x in plan.items()), t, plan))
    if not found:
        raise EdgeqError("--min-speed: no candidate type makes a valid one-type plan of this model to compare with")
    best = min(found, key=lambda f: (abs(f[0] - budget_bytes), f[0], f[1]))
    return best[1], best[2]

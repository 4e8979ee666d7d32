"""Mixed-precision plans: per-tensor (format, compensation rank) under a size budget.

A plan is a readable, versioned TOML file (``edgeq plan ... -o plan.toml``), hand-editable;
``edgeq build --plan plan.toml`` replays it exactly (same choices, same quantizer options, so
byte-identical artifacts). :func:`make_plan` is the planner:

1. **Measure.** For every linear and every candidate type of the target profile, quantize it
   (round-to-nearest with a diag(C)-weighted fit: GPTQ over every candidate would cost ~10x more;
   GPTQ then lowers the error of whatever is chosen) and record the layer's
   output error ``err = tr(E C E^T)``, and the error left after QERA compensation at every
   candidate rank (``err - sum of the top r squared singular values`` of the whitened error):
   :mod:`edgeq.quant.errcurve` (one Cholesky factor per input covariance, shared by the linears
   reading it; one GEMM per candidate type; the top singular values by randomized subspace
   iteration), so a tensor costs O(out x in x in) — the order of its GPTQ — and a layer's
   memory is its largest covariance, its factor and a few copies of its largest weight.
   The token embedding (and an untied output head) gets its KL measured directly per
   type. Each linear's error is converted to predicted KL by a measured gain
   (:mod:`edgeq.quant.sensitivity`).
2. **Choose.** Minimise the summed predicted KL subject to ``sum(bytes) <= budget``: a Lagrangian
   relaxation (each tensor picks ``argmin kl + lambda * bytes``; ``lambda`` bisected), then a
   greedy pass that spends what is left on the best KL-per-byte upgrades. Deterministic (ties
   broken by candidate order).

Bytes are the tensor's storage in its format plus ``2 * rank * (in + out)`` for an fp16
compensation branch. The budget covers the 2-D weights and their branches; 1-D tensors, file
metadata and the tokenizer are added as a fixed overhead when a total artifact size is asked for.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from edgeq.artifact import atomic_write_text
from edgeq.errors import EdgeqError
from edgeq.ir import ModelIR, n_weight_params, weight_matrix_shapes
from edgeq.quant.codecs import codec_for
from edgeq.quant.errcurve import Whitener
from edgeq.quant import act_noise, storage
from edgeq.quant.gptq import GPTQConfig, gptq, rtn
from edgeq.quant.intgroup import storage_codec
from edgeq.quant.reference import roundtrip
from edgeq.quant.sensitivity import SENSITIVITIES, fisher_gains, measure_gains
from edgeq.quant.solve import solve, tensor_sort_key
from edgeq.quant.speed import SpeedModel, matmul_weights, plan_seconds, uniform_reference
from edgeq.streaming import layer_workers, ordered_map

PLAN_VERSION = 1
QUANTIZERS = ("gptq", "rtn")
COMPENSATIONS = ("qera", "svd")
# Float formats a plan may name besides the quantized ones.
FLOAT_TYPES = ("F16", "F32")
# Compensation ranks are only candidates for types below this many bits per weight.
RANK_MAX_BPW = 6.0
# QERA's damping of the covariance (edgeq.quant.compensate.compensation's default), for the rank curves.
WHITEN_DAMP = 1e-4


@dataclass(frozen=True)
class Choice:
    type: str
    rank: int = 0


@dataclass
class Plan:
    target: str
    format: str = "gguf"
    quantizer: str = "gptq"
    compensation: str = "qera"
    damp: float = 0.01
    act_order: bool = False
    tensors: dict[str, Choice] = field(default_factory=dict)
    budget_bytes: int | None = None  # 2-D weights + branches
    model: str = ""
    notes: dict[str, dict] = field(default_factory=dict)  # per tensor: predicted bytes / kl (informational)
    summary: dict = field(default_factory=dict)  # informational

    def check(self, ir: ModelIR | None = None, where: str = "plan") -> None:
        if self.quantizer not in QUANTIZERS:
            raise EdgeqError(f"{where}: quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        if self.compensation not in COMPENSATIONS:
            raise EdgeqError(f"{where}: compensation must be one of {', '.join(COMPENSATIONS)}, "
                             f"got {self.compensation!r}")
        if not (0 <= self.damp < 1):
            raise EdgeqError(f"{where}: damp must be in [0, 1), got {self.damp}")
        known = {t.name for t in storage.for_backend(self.format)}
        for name, c in self.tensors.items():
            if c.type not in known:
                if storage.find(c.type) is None or storage.find(c.type).name != c.type:
                    raise EdgeqError(f"{where}: {_shown(name)}: unknown type {c.type!r} (known: {', '.join(sorted(known))})")
                storage.plannable([c.type], self.format, f"{where}: {_shown(name)}: ")
            if c.rank < 0:
                raise EdgeqError(f"{where}: {_shown(name)}: rank must be >= 0, got {c.rank}")
        if ir is None:
            return
        want = set(plan_tensor_shapes(ir))
        missing = sorted(want - set(self.tensors))
        extra = sorted(set(self.tensors) - want)
        if missing or extra:
            raise EdgeqError(f"{where}: does not match the model: "
                             + (f"no choice for {missing[:3]}" if missing else f"unknown tensors {extra[:3]}"))
        shapes = plan_tensor_shapes(ir)
        for name, c in self.tensors.items():
            problem = choice_problem(name, shapes[name], c)
            if problem:
                raise EdgeqError(f"{where}: {problem}")

    # ---- TOML ---------------------------------------------------------------------------------
    def to_toml(self) -> str:
        def q(s: str) -> str:
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = [
            "# edgeq quantization plan: one storage type (and error-compensation rank) per tensor.",
            "# Edit freely; `edgeq build --plan <this file>` replays it exactly.",
            f"version = {PLAN_VERSION}",
            f"target = {q(self.target)}",
            f"format = {q(self.format)}",
            f"model = {q(self.model)}",
            "",
            "[method]",
            f"quantizer = {q(self.quantizer)}        # gptq | rtn",
            f"compensation = {q(self.compensation)}     # qera | svd (used where rank > 0)",
            f"damp = {self.damp!r}",
            f"act_order = {'true' if self.act_order else 'false'}",
            "",
        ]
        if self.budget_bytes is not None or self.summary:
            lines.append("[budget]  # informational: what the planner was asked for and predicted")
            if self.budget_bytes is not None:
                lines.append(f"weight_bytes = {int(self.budget_bytes)}")
            for k, v in sorted(self.summary.items()):
                lines.append(f"{k} = {_toml_value(v)}")
            lines.append("")
        lines.append("[tensors]  # name = { type, rank }; bytes/kl are the planner's predictions")
        for name in sorted(self.tensors, key=_tensor_sort_key):
            c = self.tensors[name]
            extra = ""
            n = self.notes.get(name)
            if n:
                extra = "".join(f", {k} = {_toml_value(v)}" for k, v in sorted(n.items()))
            lines.append(f"{q(name)} = {{ type = {q(c.type)}, rank = {int(c.rank)}{extra} }}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def from_toml(text: str, where: str = "plan") -> "Plan":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise EdgeqError(f"{where}: invalid TOML: {exc}") from None
        if data.get("version") != PLAN_VERSION:
            raise EdgeqError(f"{where}: expected plan version {PLAN_VERSION}, got {data.get('version')!r}")
        method, budget = data.get("method", {}), data.get("budget", {})
        for key, table in (("method", method), ("budget", budget)):
            if not isinstance(table, dict):
                raise EdgeqError(f"{where}: [{key}] must be a table")
        for key, kinds in (("damp", (int, float)), ("act_order", (bool,)), ("quantizer", (str,)),
                           ("compensation", (str,))):
            v = method.get(key)
            if v is not None and (not isinstance(v, kinds) or (bool not in kinds and isinstance(v, bool))):
                raise EdgeqError(f"{where}: method.{key} has the wrong type ({type(v).__name__})")
        wb = budget.get("weight_bytes")
        if wb is not None and (isinstance(wb, bool) or not isinstance(wb, int) or wb < 0):
            raise EdgeqError(f"{where}: budget.weight_bytes must be a non-negative integer, got {wb!r}")
        tensors_raw = data.get("tensors")
        if not isinstance(tensors_raw, dict) or not tensors_raw:
            raise EdgeqError(f"{where}: missing [tensors] table")
        tensors, notes = {}, {}
        for name, v in tensors_raw.items():
            if isinstance(v, str):
                v = {"type": v}
            if not isinstance(v, dict) or "type" not in v:
                raise EdgeqError(f"{where}: tensors.{_shown(name)}: expected {{ type = ..., rank = ... }}")
            rank = v.get("rank", 0)
            if isinstance(rank, bool) or not isinstance(rank, int):
                raise EdgeqError(f"{where}: tensors.{_shown(name)}: rank must be an integer, got {rank!r}")
            tensors[name] = Choice(str(v["type"]).upper(), int(rank))
            n = {k: x for k, x in v.items() if k not in ("type", "rank")}
            if n:
                notes[name] = n
        plan = Plan(target=str(data.get("target", "")), format=str(data.get("format", "gguf")),
                    quantizer=str(method.get("quantizer", "gptq")), compensation=str(method.get("compensation", "qera")),
                    damp=float(method.get("damp", 0.01)), act_order=bool(method.get("act_order", False)),
                    tensors=tensors, budget_bytes=budget.get("weight_bytes"), model=str(data.get("model", "")),
                    notes=notes, summary={k: v for k, v in budget.items() if k != "weight_bytes"})
        plan.check(where=where)
        return plan

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.to_toml())

    @staticmethod
    def load(path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise EdgeqError(f"{path}: plan file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EdgeqError(f"{path}: cannot read plan ({exc})") from None
        return Plan.from_toml(text, where=str(path))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(float(f"{v:.6g}")) if math.isfinite(v) else '"nan"'
    return '"' + str(v).replace('"', "'") + '"'


_tensor_sort_key = tensor_sort_key


# ---- shapes, bytes, candidates -----------------------------------------------------------------

def plan_tensor_shapes(ir: ModelIR) -> dict[str, tuple[int, int]]:
    """Every 2-D weight a plan assigns: the embedding, the untied output head, all linears."""
    return weight_matrix_shapes(ir.hparams)


def choice_problem(name: str, shape: tuple[int, int], c: Choice) -> str | None:
    info = storage.get(c.type)
    if shape[1] % info.block_size:
        return f"{name}: {c.type} needs a row length that is a multiple of {info.block_size}, got {shape[1]}"
    if c.rank and not name.startswith("blk."):
        return f"{name}: compensation ranks apply to block linears only"
    if c.rank > min(shape):
        return f"{name}: rank {c.rank} exceeds min{tuple(shape)}"
    if c.rank and info.block_size == 1:
        return f"{name}: a compensation branch on an unquantized ({c.type}) tensor is pointless"
    return None


def choice_bytes(shape: tuple[int, int], c: Choice) -> int:
    return storage.get(c.type).nbytes(shape) + 2 * c.rank * (shape[0] + shape[1])


def n_weights(ir: ModelIR) -> int:
    return n_weight_params(ir.hparams)


def plan_bytes(ir: ModelIR, plan: Plan) -> int:
    shapes = plan_tensor_shapes(ir)
    return sum(choice_bytes(shapes[n], c) for n, c in plan.tensors.items())


# ---- solver -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    choice: Choice
    nbytes: int
    kl: float
    seconds: float = 0.0  # predicted decode seconds per token (edgeq.quant.speed; 0 without a speed model)


# ---- measuring -----------------------------------------------------------------------------------

def _quantized(w: np.ndarray, cov: np.ndarray | None, qtype: str, quantizer: str, damp: float, act_order: bool):
    """GPTQ under ``cov``, or round-to-nearest weighted by its diagonal (``cov`` may be given as
    that diagonal, a 1-D array, for RTN)."""
    codec = storage_codec(qtype)
    if quantizer == "gptq" and cov is not None:
        return gptq(w, cov, codec, GPTQConfig(damp=damp, act_order=act_order))
    if cov is None:
        return rtn(w, codec, None)
    return rtn(w, codec, cov if np.ndim(cov) == 1 else np.diag(cov))


def _rtn_table(x: np.ndarray, qtype: str) -> np.ndarray:
    return roundtrip(x, qtype)


# A vocabulary-sized table's round-trip error (no probe) is measured on this many of its rows,
# in evenly spaced runs of TABLE_RUN rows: the mean squared error of 128256 x 3072 values to
# ~0.1 %, for an eighth of the time (every row is quantized on its own, so a row sample is exact
# in expectation). Tables with fewer rows are measured whole.
TABLE_SAMPLE_ROWS = 16384
TABLE_RUN = 1024


def _table_mse(x, qtype: str, rows: int = TABLE_RUN) -> float:
    """Mean squared round-trip error of a (vocab, hidden) table, ``rows`` rows at a time, on
    ``TABLE_SAMPLE_ROWS`` evenly spaced rows of a larger table (never the whole table in memory)."""
    n = x.shape[0]
    runs = -(-min(n, TABLE_SAMPLE_ROWS) // rows)
    starts = range(0, n, rows) if n <= TABLE_SAMPLE_ROWS else \
        sorted({int(round(i * (n - rows) / max(runs - 1, 1))) for i in range(runs)})
    total, count = 0.0, 0
    for r0 in starts:
        part = np.asarray(x[r0:r0 + rows], dtype=np.float32)
        total += float(np.square((_rtn_table(part, qtype) - part).astype(np.float64)).sum())
        count += part.size
    return total / count


def measure_options(ir: ModelIR, stats, types: Sequence[str], ranks: Sequence[int], quantizer: str = "rtn",
                    damp: float = 0.01, act_order: bool = False, probe=None, ref_type: str | None = None,
                    progress: bool = True, log: Callable[[str], None] | None = None,
                    format: str = "gguf", sensitivity: str = "kl-probe",
                    whitener: Callable[..., Whitener] = Whitener,
                    linears: Sequence[str] | None = None, tables: bool = True,
                    workers: int | None = None, activations: str = "llama-cpu") -> dict[str, list[Option]]:
    """Candidate options with predicted KL for every plan tensor (see the module doc); ``types``
    must be storage types the ``format`` backend stores (edgeq.quant.storage).
    ``sensitivity``: how ``probe`` converts layer errors into KL (:mod:`edgeq.quant.sensitivity`):
    "kl-probe" (a tail re-run per tensor) or "fisher" (second order, all tensors at once).
    ``whitener``: how layer errors are computed (edgeq.quant.errcurve; ``ExactWhitener`` is the
    dense reference the default is checked against, tools/bench_plan_cost.py).
    ``linears`` / ``tables``: measure only these block linears / leave out the embedding and
    output head (for benchmarks; a plan needs every tensor).
    ``workers``: a layer's linears measured on this many threads at once (default
    :func:`edgeq.streaming.layer_workers`, which the plan step sets from the memory available,
    edgeq.memory.planner_workers); the table does not depend on it.
    ``activations``: the runtime's activation rounding before each matmul (edgeq.quant.act_noise:
    ``llama-cpu``, ``llama-cuda``, ``none``), whose output error each option adds to its weight
    error (measured per input channel at calibration; statistics without it add nothing)."""
    if activations not in act_noise.MODELS:
        raise EdgeqError(f"activations must be one of {', '.join(act_noise.MODELS)}, got {activations!r}")
    if sensitivity not in SENSITIVITIES:
        raise EdgeqError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, got {sensitivity!r}")
    shapes = plan_tensor_shapes(ir)
    types = list(storage.plannable(types, format, "planner: "))
    quant_types = [t for t in types if storage.get(t).block_size > 1]
    ref_type = ref_type or (min(quant_types, key=lambda t: storage.get(t).bits_per_weight())
                            if quant_types else types[0])
    ranks = sorted({int(r) for r in ranks} | {0})
    errs: dict[str, dict[Choice, float]] = {}
    names = [n for n in shapes if n.startswith("blk.") and (linears is None or n in set(linears))]
    bar = tqdm(total=len(names), desc=f"measuring {len(types)} types x {len(ranks)} ranks", unit="tensor",
               leave=False) if progress else None
    ref_weights: dict[str, np.ndarray] = {}  # only for the probe (which holds the whole model anyway)
    ref_base: dict[str, float] = {}

    def measure(item) -> tuple[dict[Choice, float], np.ndarray | None]:
        """One linear's errors at every candidate (and the reference type's dequantized weights
        when the probe needs them): the same computation on whichever thread runs it."""
        name, wh, cov = item
        lin = ir.linears[name]
        w = np.asarray(lin.weight, dtype=np.float32)
        e: dict[Choice, float] = {}
        ref = None
        layer_stats = stats.layers[lin.layer]
        col = act_noise.column_energy(w) if activations != "none" else None  # once per linear, not per type

        def act_err(t: str) -> float:  # the output error of the runtime's rounding of this linear's input
            return act_noise.weighted_noise(col, layer_stats.input_noise(lin.role, act_noise.dot_codec(t, activations)))

        for t in types:
            info = storage.get(t)
            if info.block_size == 1:
                e[Choice(t, 0)] = wh.curve(w - _rtn_table(w, t), ())[0] + act_err(t)
                continue
            if w.shape[1] % info.block_size:
                continue
            res = _quantized(w, wh.cov_diag if quantizer == "rtn" else cov, t, quantizer, damp, act_order)
            # compensation only pays below ~6 bits per weight (an 8-bit error is already tiny)
            rr = [r for r in ranks if 0 < r <= min(w.shape)] if info.bits_per_weight() < RANK_MAX_BPW else []
            base, curve = wh.curve(w - res.dequant, rr)
            a = act_err(t)
            e[Choice(t, 0)] = base + a
            for r in rr:
                e[Choice(t, r)] = curve[r] + a
            if t == ref_type and probe is not None:
                # the gain is KL / err of the same perturbation: the weight error alone (the probe
                # perturbs only the weights)
                ref = (res.dequant, base)
            del res
        return e, ref

    workers = layer_workers() if workers is None else max(1, int(workers))
    for layer in sorted({ir.linears[n].layer for n in names}):
        # the layer's factors first (one per input covariance, shared by q/k/v and by gate/up), then
        # its linears on up to ``workers`` threads (BLAS held to one thread: the same bits for any count)
        whiteners: dict[int, Whitener] = {}
        items = []
        for name in (n for n in names if ir.linears[n].layer == layer):
            cov = stats.layers[layer].input_cov(ir.linears[name].role)
            if id(cov) not in whiteners:
                whiteners[id(cov)] = whitener(cov, WHITEN_DAMP)
            items.append((name, whiteners[id(cov)], cov))
        for (name, _, _), (e, ref) in zip(items, ordered_map(measure, items, workers=workers)):
            errs[name] = e
            if ref is not None:
                ref_weights[name], ref_base[name] = ref
            if bar is not None:
                bar.update(1)
        del whiteners, items  # the previous layer's factors are not needed again
    if bar is not None:
        bar.close()
    table: dict[str, list[Option]] = {}
    if probe is not None and ref_weights:
        ref_errs = {n: ref_base[n] for n in ref_weights}
        if sensitivity == "fisher":
            gains = fisher_gains(ir, ref_errs, lambda n: ref_weights[n], probe)
        else:
            gains = measure_gains(ir, ref_errs, lambda n: ref_weights[n], probe, progress=progress)
    else:
        gains = {n: 1.0 for n in names}
    for name in names:
        table[name] = [Option(c, choice_bytes(shapes[name], c), gains.get(name, 1.0) * v)
                       for c, v in errs[name].items()]
    for name in [n for n in shapes if not n.startswith("blk.") and tables]:
        src = ir.tensors[name] if name in ir.tensors else ir.output_weight()
        opts = []
        for t in types:
            if shapes[name][1] % storage.get(t).block_size:
                continue
            if probe is None:  # mean squared error, in row chunks (a vocabulary-sized table never whole)
                kl = _table_mse(src, t)
            elif name == "token_embd":
                kl = probe.embedding_kl(_rtn_table(src, t))
            else:
                kl = probe.output_kl(_rtn_table(src, t))
            opts.append(Option(Choice(t, 0), choice_bytes(shapes[name], Choice(t, 0)), max(kl, 0.0)))
        table[name] = opts
    return table


def plan_activations(kind: str) -> str:
    """The activation rounding a GGUF runtime of a profile's device kind applies before its
    matmuls (edgeq.quant.act_noise): llama.cpp's CUDA kernels on a GPU, its CPU kernels otherwise."""
    return "llama-cuda" if kind == "gpu" else "llama-cpu"


def make_plan(ir: ModelIR, stats, target: str, types: Sequence[str], ranks: Sequence[int], budget_bytes: int,
              quantizer: str = "gptq", compensation: str = "qera", damp: float = 0.01, act_order: bool = False,
              probe=None, progress: bool = True, table: Mapping[str, Sequence[Option]] | None = None,
              model: str = "", format: str = "gguf", sensitivity: str = "kl-probe",
              speed: SpeedModel | None = None, min_speed: float | None = None,
              uniform: Callable[[str], Mapping[str, str]] | None = None,
              activations: str = "llama-cpu") -> Plan:
    """The planner's plan for the ``format`` backend: ``types`` are the candidates (storage types
    that backend stores; any other is an error, see edgeq.quant.storage.plannable).
    ``activations``: the runtime's activation rounding (:func:`measure_options`).

    ``speed``: a decode-speed cost model (edgeq.quant.speed); with ``min_speed`` the plan must also
    be predicted to decode at least ``min_speed`` times as fast as the uniform plan of the same
    size (:func:`edgeq.quant.speed.uniform_reference`; ``uniform(base_type)`` gives the one-type build's types per
    tensor, default every tensor in that type)."""
    types = list(storage.plannable(types, format, "planner: "))
    if table is None:  # measured with RTN (weighted fit): ~10x faster than GPTQ over every candidate type
        table = measure_options(ir, stats, types, ranks, "rtn", damp, act_order, probe, progress=progress,
                                format=format, sensitivity=sensitivity, activations=activations)
    max_seconds, ref = None, None
    if speed is not None:
        shapes, mm = plan_tensor_shapes(ir), matmul_weights(ir.hparams)
        table = {n: [dataclasses.replace(o, seconds=speed.tensor_seconds(shapes[n], o.choice.type, o.choice.rank, n in mm))
                     for o in opts] for n, opts in table.items()}
        if min_speed is not None:
            base, ref_types = uniform_reference(ir.hparams, types, budget_bytes, uniform)
            ref = (base, {n: Choice(t) for n, t in ref_types.items()})
            max_seconds = plan_seconds(ir.hparams, ref[1], speed) / min_speed
    sel = solve(table, budget_bytes, max_seconds)
    plan = Plan(target=target, format=format, quantizer=quantizer, compensation=compensation, damp=damp, act_order=act_order,
                tensors={n: o.choice for n, o in sel.items()}, budget_bytes=int(budget_bytes), model=model)
    plan.notes = {n: {"bytes": o.nbytes, "kl": o.kl} for n, o in sel.items()}
    plan.summary = {"predicted_weight_bytes": sum(o.nbytes for o in sel.values()),
                    "predicted_kl": sum(o.kl for o in sel.values()),
                    "types": ",".join(types), "ranks": ",".join(str(r) for r in sorted(set(ranks)))}
    if speed is not None:
        secs = sum(o.seconds for o in sel.values())
        plan.summary.update(speed_model=f"{speed.profile}/{speed.backend} ({speed.source})",
                            predicted_ms_per_token=secs * 1e3)
        if ref is not None:
            ref_s = plan_seconds(ir.hparams, ref[1], speed)
            plan.summary.update(min_speed=float(min_speed), speed_reference=f"uniform {ref[0]}",
                                reference_ms_per_token=ref_s * 1e3, predicted_speed_vs_reference=ref_s / secs)
    return plan


def _shown(name: str) -> str:
    """A tensor name for a one-line message (escaped when it holds newlines or other controls)."""
    return name if name.isprintable() else repr(name)

"""`edgeq build`: model (+ adapters) -> verified artifact directory, atomically.

:class:`BuildOptions` is what the user typed; :func:`steps` turns it into the build's step list
(front end -> adapters (merge or keep) -> memory check -> [calibrate -> sort (UniQL, FLAP or naive) ->
rate plan -> recovery fine-tune] -> [quantization plan -> calibrate -> quantize] -> lower ->
goldens), frozen, versioned configs that :mod:`edgeq.pipeline` runs and records in the manifest.
Everything format-specific lives in the format's backend (edgeq/backends/<format>/backend.py).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgeq import backends, pipeline
from edgeq.chat_template import BUILTIN, check as check_template, resolve as resolve_template
from edgeq.errors import EdgeqError
from edgeq.kernels.spec import ACTS
from edgeq.pipeline import (
    AdaptersStep,
    BuildContext,
    CalibrateStep,
    ChatTemplateStep,
    CheckMemoryStep,
    GoldensStep,
    LoadStep,
    LowerStep,
    PlanStep,
    PruneBiasStep,
    QuantizeStep,
    RatePlanStep,
    RecoverStep,
    SortStep,
    Step,
)
from edgeq.quant import storage
from edgeq.targets import TargetProfile, load_target

SORTS = ("uniql", "naive", "flap")
# per-layer pruning allocation (edgeq.passes.rate_plan / prune_alloc)
IMPORTANCES = ("angular", "uniform", "measured", "fluctuation")
# --min-speed above this asks for a plan this many times faster than a uniform one: a typo
MAX_MIN_SPEED = 4.0


@dataclass(frozen=True)
class BuildOptions:
    """What the user typed (``edgeq build`` options); :func:`steps` makes the build from it."""

    model: Path
    out: Path
    target: str = "cpu-avx2"
    format: str | None = "gguf"  # None: the target profile's first format this edgeq lowers
    bits: int | None = None  # None: the target profile's default
    qtype: str | None = None  # explicit base weight type (overrides bits), e.g. "Q4_1"
    adapters: tuple[Path, ...] = ()
    adapter_mode: str = "merge"  # merge | separate
    force: bool = False
    record_goldens: bool = True
    prune_rates: tuple[float, ...] | None = None  # None / (0,): no structured pruning
    sort: str = "uniql"  # uniql | naive (weight-norm baseline) | flap (FLAP's fluctuation metric)
    # angular | uniform | measured | fluctuation per-layer allocation (measured, fluctuation: --prune-dims mlp;
    # fluctuation: --sort flap)
    importance: str = "angular"
    calib_samples: int = 64
    calib_len: int = 256
    calib_data: Path | None = None
    recover: bool = False
    recover_steps: int | None = None
    recover_loss: str = "ce"  # ce | kl: the recovery's loss (edgeq.passes.recover)
    prune_bias: bool = False  # per-rate bias compensation of the pruned inputs' mean (edgeq.passes.prune_bias)
    prune_dims: str = "all"  # all | mlp: what a rate prunes (edgeq.passes.rate_plan)
    plan: Path | None = None  # replay this quantization plan (edgeq plan / plan.toml of an artifact)
    budget_mb: float | None = None  # planner budget: total artifact MB (1e6 bytes)
    bpw: float | None = None  # planner budget: bits per 2-D weight (default: the target's plan.default_bpw)
    probe_samples: int = 4  # planner: calibration sequences for the KL sensitivity probe
    sensitivity: str = "kl-probe"  # planner: kl-probe (a tail re-run per tensor) | fisher (backward passes)
    min_speed: float | None = None  # planner: predicted decode >= this x the uniform plan of the same size
    tvm_activations: str | None = None  # tvm kernels: float32 | int8; None: the profile's [deploy] tvm_activations
    chat_template: str | None = None  # a built-in template name or a jinja file, replacing the checkpoint's

    @property
    def planned(self) -> bool:
        """Quantize through a plan (given, or made by the planner) rather than one uniform type."""
        backend = backends.find(self.format)
        if backend is None or not backend.plans:
            return False
        return self.plan is not None or (self.bits is None and self.qtype is None and not self.prunes)

    @property
    def prunes(self) -> bool:
        return bool(self.prune_rates) and any(r > 0 for r in self.prune_rates)

    def to_json(self) -> dict:
        d = {"target": self.target, "format": self.format, "bits": self.bits, "qtype": self.qtype,
             "adapter_mode": self.adapter_mode, "adapters": [p.name for p in self.adapters]}
        if self.planned:
            d.update(plan=self.plan.name if self.plan else None, budget_mb=self.budget_mb, bpw=self.bpw,
                     calib_samples=self.calib_samples, calib_len=self.calib_len, probe_samples=self.probe_samples)
            if self.sensitivity != "kl-probe":  # (the default's manifests stay as they were)
                d["sensitivity"] = self.sensitivity
            if self.min_speed is not None:
                d["min_speed"] = self.min_speed
        if self.prunes:
            d.update(prune_rates=list(self.prune_rates), sort=self.sort, importance=self.importance,
                     calib_samples=self.calib_samples, calib_len=self.calib_len, recover=self.recover,
                     recover_steps=self.recover_steps)
            if self.prune_bias:  # (the defaults' manifests stay as they were)
                d["prune_bias"] = True
            if self.prune_dims != "all":
                d["prune_dims"] = self.prune_dims
            if self.recover and self.recover_loss != "ce":
                d["recover_loss"] = self.recover_loss
        if self.tvm_activations is not None:  # (the default's manifests stay as they were)
            d["tvm_activations"] = self.tvm_activations
        if self.chat_template is not None:
            d["chat_template"] = self.chat_template if self.chat_template in BUILTIN else Path(self.chat_template).name
        return d


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def _log(msg: str) -> None:
    import click

    click.echo(msg, err=True)


def check_options(opts: BuildOptions, target: TargetProfile) -> None:
    backend = backends.get(opts.format)
    if not backend.on_every_target and opts.format not in target.formats:
        raise EdgeqError(f"target {target.name} does not run {opts.format} artifacts "
                         f"(it runs: {', '.join(target.formats)})")
    if opts.adapter_mode not in ("merge", "separate"):
        raise EdgeqError(f"unknown adapter mode {opts.adapter_mode!r} (merge or separate)")
    if opts.tvm_activations is not None:
        if opts.format != "tvm":
            raise EdgeqError(f"--tvm-activations chooses the tvm format's kernels; this build writes {opts.format}")
        if opts.tvm_activations not in ACTS:
            raise EdgeqError(f"--tvm-activations must be {' or '.join(ACTS)}, got {opts.tvm_activations!r}")
    if opts.chat_template is not None:  # read and rendered before any step (the vocabulary check: at its step)
        check_template(opts.chat_template, resolve_template(opts.chat_template))
    if opts.bits is not None and opts.bits not in storage.bits_choices():
        raise EdgeqError(f"unsupported --bits {opts.bits} ({storage.or_list(storage.bits_choices())})")
    backend.check_options(opts, target)
    if opts.prunes:
        if opts.adapter_mode == "separate" and opts.adapters:
            raise EdgeqError("structured pruning needs merged adapters; use --adapter-mode merge")
        if opts.sort not in SORTS:
            raise EdgeqError(f"unknown sort {opts.sort!r} (available: {', '.join(SORTS)})")
        if opts.importance not in IMPORTANCES:
            raise EdgeqError(f"unknown importance {opts.importance!r} ({', '.join(IMPORTANCES)})")
        if opts.importance in ("measured", "fluctuation") and opts.prune_dims != "mlp":
            raise EdgeqError(f"--importance {opts.importance} allocates MLP channels only; add --prune-dims mlp")
        if opts.importance == "fluctuation" and opts.sort != "flap":
            raise EdgeqError("--importance fluctuation compares FLAP's channel scores across layers; add --sort flap")
        if opts.calib_samples < 1 or opts.calib_len < 16:
            raise EdgeqError("--calib-samples must be >= 1 and --calib-len >= 16")
        from edgeq.passes.rate_plan import DIMS

        if opts.prune_dims not in DIMS:
            raise EdgeqError(f"unknown --prune-dims {opts.prune_dims!r} ({' or '.join(DIMS)})")
        if opts.recover_loss not in ("ce", "kl"):
            raise EdgeqError(f"unknown --recover-loss {opts.recover_loss!r} (ce or kl)")
        if opts.recover_loss != "ce" and not opts.recover:
            raise EdgeqError("--recover-loss needs --recover")
        if opts.recover_steps is not None and opts.recover_steps < 1:
            raise EdgeqError(f"--recover-steps must be >= 1, got {opts.recover_steps}")
    elif opts.recover:
        raise EdgeqError("--recover needs --prune-rates with a rate above 0")
    elif opts.prune_bias:
        raise EdgeqError("--prune-bias needs --prune-rates with a rate above 0")
    elif opts.recover_loss != "ce":
        raise EdgeqError("--recover-loss needs --recover and --prune-rates with a rate above 0")
    elif opts.prune_dims != "all":
        raise EdgeqError("--prune-dims needs --prune-rates with a rate above 0")
    if opts.plan is not None and (opts.bits is not None or opts.qtype is not None):
        raise EdgeqError("--plan fixes every tensor's type; drop --bits/--qtype")
    if opts.plan is not None and not backend.plans:
        planning = ", ".join(b.name for b in backends.backends() if b.plans)
        raise EdgeqError(f"--plan is supported for the {planning} format (got {opts.format})")
    if opts.plan is not None and opts.prunes:
        raise EdgeqError("--plan with --prune-rates is not supported yet (per-rate GGUF files are "
                         "re-quantized uniformly); use --bits/--qtype with --prune-rates")
    if opts.budget_mb is not None and opts.bpw is not None:
        raise EdgeqError("give one of --budget-mb and --bpw, not both")
    if (opts.budget_mb is not None or opts.bpw is not None) and not opts.planned:
        raise EdgeqError("--budget-mb/--bpw size a planned build; drop --bits/--qtype/--plan")
    if (opts.budget_mb is not None and opts.budget_mb <= 0) or (opts.bpw is not None and opts.bpw <= 0):
        raise EdgeqError("--budget-mb and --bpw must be positive")
    if opts.min_speed is not None:
        if not opts.planned or opts.plan is not None:
            raise EdgeqError("--min-speed constrains the planner: drop --bits/--qtype/--plan")
        if not math.isfinite(opts.min_speed) or not 0 < opts.min_speed <= MAX_MIN_SPEED:
            raise EdgeqError(f"--min-speed must be in (0, {MAX_MIN_SPEED:g}] (relative to the uniform plan of the "
                             f"same size), got {opts.min_speed:g}")


def front_steps(opts: BuildOptions) -> list[Step]:
    """Front end: load the model, attach adapters (merged unless kept separate)."""
    out: list[Step] = [LoadStep(model=str(opts.model))]
    if opts.adapters:
        out.append(AdaptersStep(paths=tuple(str(p) for p in opts.adapters), merge=opts.adapter_mode == "merge"))
    if opts.chat_template is not None:
        text = resolve_template(opts.chat_template)
        out.append(ChatTemplateStep(value=opts.chat_template if opts.chat_template in BUILTIN
                                    else Path(opts.chat_template).name, template=text))
    return out


def _calibrate(opts: BuildOptions) -> CalibrateStep:
    return CalibrateStep(samples=opts.calib_samples, seq_len=opts.calib_len,
                         data=None if opts.calib_data is None else str(opts.calib_data))


def _planning(opts: BuildOptions) -> list[Step]:
    """Plan and calibrate (a plan file is loaded and checked first; the planner needs the statistics)."""
    plan = PlanStep(format=opts.format, file=None if opts.plan is None else str(opts.plan), budget_mb=opts.budget_mb,
                    bpw=opts.bpw, probe_samples=opts.probe_samples, sensitivity=opts.sensitivity,
                    min_speed=opts.min_speed)
    return [plan, _calibrate(opts)] if opts.plan is not None else [_calibrate(opts), plan]


def compress_steps(opts: BuildOptions, target: TargetProfile) -> list[Step]:
    """Structured pruning (issue 3's method): calibrate, sort, plan the rates, optionally recover,
    optionally bias compensation (issue 15).
    Part of :func:`steps`; the pruning benchmarks (tools/bench_prune.py, bench_onnx_rates.py) run
    these steps alone through the same runner (``edgeq.pipeline.run``)."""
    from edgeq.passes.rate_plan import check_rates

    rates = check_rates(opts.prune_rates)
    out: list[Step] = [_calibrate(opts)]
    if opts.prune_bias:  # the calibration's means, carried through the sorts into their order
        out.append(PruneBiasStep(source="calibration"))
    out += [SortStep(method=opts.sort),
            RatePlanStep(rates=rates, granularity=target.prune_granularity, importance=opts.importance,
                         dims=opts.prune_dims, probe_samples=opts.probe_samples)]
    if opts.recover:
        out.append(RecoverStep(steps=opts.recover_steps, data=None if opts.calib_data is None else str(opts.calib_data),
                               loss=opts.recover_loss))
    if opts.prune_bias and opts.recover:  # recovery changed the model: its means, measured again
        out.append(PruneBiasStep(source="measure"))
    return out


def steps(opts: BuildOptions, target: TargetProfile) -> list[Step]:
    """The build's steps for ``opts`` (format resolved, options checked) on ``target``."""
    out = front_steps(opts)
    out.append(CheckMemoryStep(format=opts.format, prunes=opts.prunes, planned=opts.planned, recover=opts.recover,
                               goldens=opts.record_goldens, calib_samples=opts.calib_samples,
                               calib_len=opts.calib_len, probe_samples=opts.probe_samples,
                               measured=opts.prunes and opts.importance == "measured"))
    if opts.prunes:
        out += compress_steps(opts, target)
    if opts.planned:
        out += [*_planning(opts), QuantizeStep()]
    out.append(LowerStep(format=opts.format))
    if opts.record_goldens:
        out.append(GoldensStep())
    return out


def plan_steps(opts: BuildOptions) -> list[Step]:
    """`edgeq plan`: load the model (+ adapters), calibrate, plan; nothing is written."""
    return [*front_steps(opts), *_planning(opts)]


def resolve_format(opts: BuildOptions, target: TargetProfile) -> BuildOptions:
    """``opts`` with the format filled in: the target profile's first format this edgeq lowers."""
    if opts.format is not None:
        return opts
    return dataclasses.replace(opts, format=next((f.value for f in target.formats if backends.find(f.value)), "gguf"))


def build(opts: BuildOptions, log: Callable[[str], None] = _log, executor: str | None = None, jobs: int | None = None,
          ray_address: str | None = None) -> BuildResult:
    """Run the build's steps with what passes produce parked on disk (``edgeq.spill``) next to the
    output, so memory holds about a layer at a time; the spill directory is removed at the end.
    ``executor`` (processes, ray, ray://HOST:PORT; or ``ray_address``): the quantize step's linears
    run as tasks there (:mod:`edgeq.pipeline.split`); default in this process, one after another."""
    from edgeq.pipeline.split import open_split
    from edgeq.spill import spilling

    t_start = time.perf_counter()
    target = load_target(opts.target)
    opts = resolve_format(opts, target)
    check_options(opts, target)
    where = Path(opts.out).resolve().parent
    with spilling(where), open_split(executor, where, jobs, ray_address) as split:
        ctx = pipeline.run(steps(opts, target), BuildContext(opts=opts, target=target, log=log, split=split),
                           out=Path(opts.out), force=opts.force)
    return BuildResult(out=Path(opts.out), manifest=ctx.manifest, seconds=time.perf_counter() - t_start,
                       timings=ctx.timings)

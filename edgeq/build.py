"""`edgeq build`: model (+ adapters) -> verified artifact directory, atomically.

Pipeline: front end -> adapters (merge or keep) -> [calibrate -> sort (UniQL or naive) ->
recovery fine-tune -> rate plan] -> [quantization plan] -> backend.lower -> goldens -> manifest.
Everything format-specific lives in the format's backend (edgeq/backends/<format>/backend.py).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq import backends, goldens
from edgeq.artifact import GOLDENS, atomic_directory, dump_json, write_manifest
from edgeq.errors import EdgeqError
from edgeq.frontend import load_adapter, load_model, merge_adapters
from edgeq.ir import ModelIR
from edgeq.targets import TargetProfile, load_target

SORTS = ("uniql", "naive")


@dataclass(frozen=True)
class BuildOptions:
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
    sort: str = "uniql"  # uniql | naive (weight-norm baseline)
    importance: str = "angular"  # angular | uniform per-layer allocation
    calib_samples: int = 64
    calib_len: int = 256
    calib_data: Path | None = None
    recover: bool = False
    recover_steps: int | None = None
    plan: Path | None = None  # replay this quantization plan (edgeq plan / plan.toml of an artifact)
    budget_mb: float | None = None  # planner budget: total artifact MB (1e6 bytes)
    bpw: float | None = None  # planner budget: bits per 2-D weight (default: the target's plan.default_bpw)
    probe_samples: int = 4  # planner: calibration sequences for the KL sensitivity probe
    sensitivity: str = "kl-probe"  # planner: kl-probe (a tail re-run per tensor) | fisher (backward passes)

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
        if self.prunes:
            d.update(prune_rates=list(self.prune_rates), sort=self.sort, importance=self.importance,
                     calib_samples=self.calib_samples, calib_len=self.calib_len, recover=self.recover,
                     recover_steps=self.recover_steps)
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


def prepare_ir(opts: BuildOptions, log: Callable[[str], None] = _log) -> ModelIR:
    """Front end: load the model, attach adapters, merge them if asked."""
    log(f"loading {opts.model}")
    ir = load_model(opts.model)
    for path in opts.adapters:
        log(f"loading adapter {path}")
        ir = load_adapter(ir, path)
    if opts.adapter_mode == "merge" and opts.adapters:
        ir = merge_adapters(ir)
    return ir


def check_options(opts: BuildOptions, target: TargetProfile) -> None:
    backend = backends.get(opts.format)
    if not backend.on_every_target and opts.format not in target.formats:
        raise EdgeqError(f"target {target.name} does not run {opts.format} artifacts "
                         f"(it runs: {', '.join(target.formats)})")
    if opts.adapter_mode not in ("merge", "separate"):
        raise EdgeqError(f"unknown adapter mode {opts.adapter_mode!r} (merge or separate)")
    if opts.bits is not None and opts.bits not in (4, 8, 16, 32):
        raise EdgeqError(f"unsupported --bits {opts.bits} (4, 8, 16 or 32)")
    backend.check_options(opts, target)
    if opts.prunes:
        if opts.adapter_mode == "separate" and opts.adapters:
            raise EdgeqError("structured pruning needs merged adapters; use --adapter-mode merge")
        if opts.sort not in SORTS:
            raise EdgeqError(f"unknown sort {opts.sort!r} (available: {', '.join(SORTS)})")
        if opts.importance not in ("angular", "uniform"):
            raise EdgeqError(f"unknown importance {opts.importance!r} (angular or uniform)")
        if opts.calib_samples < 1 or opts.calib_len < 16:
            raise EdgeqError("--calib-samples must be >= 1 and --calib-len >= 16")
    elif opts.recover:
        raise EdgeqError("--recover needs --prune-rates with a rate above 0")
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


def compress(ir: ModelIR, opts: BuildOptions, target: TargetProfile, log: Callable[[str], None] = _log,
             timings: dict | None = None) -> ModelIR:
    """Calibrate, sort, optionally recover, and plan the pruning rates (issue 3's method)."""
    from edgeq.calibrate import alpaca_token_sequences, calibrate
    from edgeq.passes import run_pass
    from edgeq.passes.naive_sort import naive_sort
    from edgeq.passes.rate_plan import apply_prune_spec, check_rates, plan_rates
    from edgeq.passes.uniql import UniQLSortConfig

    timings = timings if timings is not None else {}
    rates = check_rates(opts.prune_rates)
    t = time.perf_counter()
    seqs = alpaca_token_sequences(ir.tokenizer, path=opts.calib_data, n_samples=opts.calib_samples,
                                  seq_len=opts.calib_len)
    log(f"calibrating on {len(seqs)} x {opts.calib_len} Alpaca tokens")
    stats = calibrate(ir, seqs, source={"data": "alpaca", "samples": len(seqs), "seq_len": opts.calib_len})
    timings["calibrate"] = time.perf_counter() - t
    t = time.perf_counter()
    log(f"sorting ({opts.sort})")
    ir = run_pass(ir, UniQLSortConfig(), stats) if opts.sort == "uniql" else naive_sort(ir)
    timings["sort"] = time.perf_counter() - t
    importance = np.array([layer.angular for layer in stats.layers])
    spec = plan_rates(ir, rates, granularity=target.prune_granularity,
                      importance=importance if opts.importance == "angular" else None, mode=opts.importance)
    ir = apply_prune_spec(ir, spec)
    if opts.recover:
        from edgeq.passes.recover import RecoverConfig, recover

        t = time.perf_counter()
        cfg = RecoverConfig() if opts.recover_steps is None else RecoverConfig(steps=opts.recover_steps)
        log(f"recovery fine-tune ({cfg.steps} steps, LoRA r={cfg.rank}, rate sampled per step)")
        ir = recover(ir, alpaca_token_sequences(ir.tokenizer, path=opts.calib_data, n_samples=max(cfg.steps, 1)
                                                * cfg.batch_size, seq_len=cfg.seq_len, seed=1), cfg)
        timings["recover"] = time.perf_counter() - t
    return ir


def build(opts: BuildOptions, log: Callable[[str], None] = _log) -> BuildResult:
    """Run the pipeline with what passes produce parked on disk (``edgeq.spill``) next to the
    output, so memory holds about a layer at a time; the spill directory is removed at the end."""
    from edgeq.spill import spilling

    with spilling(Path(opts.out).resolve().parent):
        return _build(opts, log)


def _build(opts: BuildOptions, log: Callable[[str], None]) -> BuildResult:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    target = load_target(opts.target)
    if opts.format is None:
        opts = dataclasses.replace(opts, format=next((f.value for f in target.formats if backends.find(f.value)),
                                                     "gguf"))
    check_options(opts, target)
    backend = backends.get(opts.format)
    t = time.perf_counter()
    ir = prepare_ir(opts, log)
    timings["load"] = time.perf_counter() - t
    from edgeq.memory import check_build

    check_build(ir.hparams, log=log, fmt=opts.format, prunes=opts.prunes, planned=opts.planned,
                recover=opts.recover, goldens=opts.record_goldens, calib_samples=opts.calib_samples,
                calib_len=opts.calib_len, probe_samples=opts.probe_samples)
    if opts.prunes:
        ir = compress(ir, opts, target, log, timings)
    plan = None
    float_ir = ir
    if opts.planned:
        from edgeq.quant.apply import quantize_ir

        plan, stats = plan_for(ir, opts, target, log, timings)
        t = time.perf_counter()
        log(f"quantizing ({plan.quantizer}, compensation {plan.compensation} where rank > 0)")
        ir = quantize_ir(ir, plan, stats)
        timings["quantize"] = time.perf_counter() - t
    with atomic_directory(opts.out, force=opts.force) as tmp:
        t = time.perf_counter()
        manifest, ref_ir = backend.lower(ir, opts, target, tmp, log, plan=plan, float_ir=float_ir)
        timings["lower"] = time.perf_counter() - t
        manifest.update({
            "target": target.name,
            "options": opts.to_json(),
            "source": dict(ir.source),
            "adapters": {k: dict(v) for k, v in ir.adapters.items()},
            "hparams": ir.hparams.to_json(),
            "history": [{"name": r.name, "options": dict(r.options)} for r in ir.history],
        })
        if opts.record_goldens and not backend.runs_here(manifest):
            log(f"not recording goldens: a {manifest['format']} artifact for {target.name} does not run on this host")
        elif opts.record_goldens:
            t = time.perf_counter()
            log("recording goldens (fp32 reference and the artifact)")
            manifest["goldens"] = record_goldens(ref_ir, tmp, manifest)
            timings["goldens"] = time.perf_counter() - t
        manifest = write_manifest(tmp, manifest)
    total = time.perf_counter() - t_start
    return BuildResult(out=Path(opts.out), manifest=manifest, seconds=total, timings=timings)


def plan_for(ir: ModelIR, opts: BuildOptions, target: TargetProfile, log: Callable[[str], None] = _log,
             timings: dict | None = None):
    """(plan, calibration stats): the given plan file, or the planner's choice for the target."""
    from edgeq.calibrate import alpaca_token_sequences, calibrate
    from edgeq.plan import Plan, make_plan, n_weights

    timings = timings if timings is not None else {}
    plan = Plan.load(opts.plan) if opts.plan is not None else None
    if plan is not None:
        if plan.target and plan.target != target.name:
            raise EdgeqError(f"{opts.plan}: plan made for target {plan.target!r}, building for {target.name!r}")
        plan.check(ir, where=str(opts.plan))
    t = time.perf_counter()
    seqs = alpaca_token_sequences(ir.tokenizer, path=opts.calib_data, n_samples=opts.calib_samples,
                                  seq_len=opts.calib_len)
    log(f"calibrating on {len(seqs)} x {opts.calib_len} Alpaca tokens")
    stats = calibrate(ir, seqs, source={"data": "alpaca", "samples": len(seqs), "seq_len": opts.calib_len})
    timings["calibrate"] = timings.get("calibrate", 0.0) + time.perf_counter() - t
    if plan is not None:
        return plan, stats
    t = time.perf_counter()
    budget = planner_budget(ir, opts, target)
    types = target.plan_types(opts.format)
    probe = None
    from edgeq.memory import available_bytes, probe_bytes

    need, avail = probe_bytes(ir.hparams, opts.probe_samples, opts.sensitivity), available_bytes()
    if need > avail:  # the probe runs the whole model in torch: too big here, weigh layer errors instead
        log(f"warning: the {opts.sensitivity} sensitivity probe would need ~{need / 1e9:.1f} GB ({avail / 1e9:.1f} GB available); "
            "the planner weighs each tensor's layer output error instead")
    else:
        try:
            from edgeq.quant.sensitivity import KLProbe

            n = max(1, min(opts.probe_samples, len(seqs)))
            probe = KLProbe(ir, [s[:min(len(s), 128)] for s in seqs[-n:]], threads=None)
        except EdgeqError as exc:  # torch missing: fall back to unweighted output errors
            log(f"warning: no KL sensitivity probe ({exc}); the planner weighs raw layer output errors")
    log(f"planning: {len(types)} types x ranks {list(target.plan_ranks)} for a {budget / 1e6:.2f} MB weight budget")
    plan = make_plan(ir, stats, target.name, types, target.plan_ranks, budget, probe=probe,
                     model=str(ir.source.get("name") or Path(str(ir.source.get("path", ""))).name),
                     sensitivity=opts.sensitivity)
    plan.summary["bpw"] = round(budget * 8 / n_weights(ir), 4)
    plan.summary["sensitivity"] = opts.sensitivity if probe is not None else "layer-output-error"
    timings["plan"] = time.perf_counter() - t
    return plan, stats


def planner_budget(ir: ModelIR, opts: BuildOptions, target: TargetProfile) -> int:
    """Bytes for the 2-D weights (+ branches): from --budget-mb (minus the fixed overhead),
    --bpw, or the target's default bits per weight."""
    from edgeq.plan import n_weights

    fixed_overhead_bytes = backends.get(opts.format).fixed_overhead_bytes
    if opts.budget_mb is not None:
        budget = int(opts.budget_mb * 1e6) - fixed_overhead_bytes(ir)
        if budget <= 0:
            raise EdgeqError(f"--budget-mb {opts.budget_mb} does not even cover the file overhead "
                             f"({fixed_overhead_bytes(ir) / 1e6:.2f} MB)")
        return budget
    bpw = opts.bpw if opts.bpw is not None else target.plan_bpw
    if bpw is None:
        raise EdgeqError(f"target {target.name} has no plan.default_bpw; pass --bpw or --budget-mb")
    return int(bpw * n_weights(ir) / 8)


def record_goldens(ref_ir: ModelIR, root: Path, manifest: dict) -> dict:
    """Goldens at every carried rate: the float64 reference at that rate and the artifact.

    The reference runs layer by layer (``runtimes.reference.streamed_logits``: one layer's
    float32 weights in memory at a time, float64 arithmetic), so recording goldens is bounded by
    a layer whatever the model's size."""
    from edgeq.session import artifact_rates, open_session, rate_key
    from runtimes.reference import streamed_logits
    from runtimes.text import SpecTextMixin

    class _Tokenizer(SpecTextMixin):
        def _tokenizer_spec(self):
            return ref_ir.tokenizer

    token_ids = goldens.golden_token_ids(_Tokenizer())
    data = {"prompts": list(goldens.GOLDEN_PROMPTS), "token_ids": token_ids, "rates": {}}
    rates = artifact_rates(manifest)
    for rate in rates:
        lps = [goldens.log_softmax(lg) for lg in streamed_logits(ref_ir, token_ids, rate)]
        data["rates"][rate_key(rate)] = {"reference": goldens.record_logprobs(lps)}
    for rate in rates:
        with open_session(root, n_ctx=256, manifest=manifest, prune=rate) as art:
            data["rates"][rate_key(rate)]["artifact"] = goldens.record(art, token_ids)
    dump_json(data, root / GOLDENS)
    return {"file": GOLDENS, "positions": sum(len(t) for t in token_ids), "topk": goldens.GOLDEN_TOPK,
            "rates": [rate_key(r) for r in rates],
            "reference": {"runtime": "reference", "weights": "float32", "arithmetic": "float64",
                          "mode": "layer by layer"}}

"""`edgeq build`: model (+ adapters) -> verified artifact directory, atomically.

Pipeline: front end -> adapters (merge or keep) -> [calibrate -> sort (UniQL or naive) ->
recovery fine-tune -> rate plan] -> lowering (gguf | reference) -> goldens -> manifest.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq import goldens
from edgeq.artifact import GOLDENS, atomic_directory, dump_json, write_manifest
from edgeq.errors import EdgeqError
from edgeq.frontend import load_adapter, load_model, merge_adapters
from edgeq.ir import ModelIR, Role, linear_name
from edgeq.targets import TargetProfile, load_target

FORMATS = ("gguf", "onnx", "tvm", "reference")
MODEL_FILE = "model.gguf"
PLAN_FILE = "plan.toml"
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

    @property
    def planned(self) -> bool:
        """Quantize through a plan (given, or made by the planner) rather than one uniform type."""
        if self.format != "gguf":
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
    if opts.format not in FORMATS:
        raise EdgeqError(f"unknown format {opts.format!r} (available: {', '.join(FORMATS)})")
    if opts.format != "reference" and opts.format not in target.formats:
        raise EdgeqError(f"target {target.name} does not run {opts.format} artifacts "
                         f"(it runs: {', '.join(target.formats)})")
    if opts.adapter_mode not in ("merge", "separate"):
        raise EdgeqError(f"unknown adapter mode {opts.adapter_mode!r} (merge or separate)")
    if opts.bits is not None and opts.bits not in (4, 8, 16, 32):
        raise EdgeqError(f"unsupported --bits {opts.bits} (4, 8, 16 or 32)")
    if opts.format == "reference" and (opts.qtype or opts.bits not in (None, 32)):
        raise EdgeqError("the reference format stores float32 weights; drop --bits/--qtype")
    if opts.format == "tvm":
        if opts.qtype:
            raise EdgeqError("--qtype names a GGUF type; the tvm format takes --bits 4 or 8")
        if opts.bits not in (None, 4, 8):
            raise EdgeqError("the tvm format stores int4 or int8 weights (generated kernels): --bits 4 or 8")
    if opts.format == "onnx":
        if opts.qtype:
            raise EdgeqError("--qtype names a GGUF type; the onnx format takes --bits 4, 8 or 32")
        if opts.bits == 16:
            raise EdgeqError("the onnx format stores int4/int8 (MatMulNBits) or float32 weights: --bits 4, 8 or 32")
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
    if opts.plan is not None and opts.format != "gguf":
        raise EdgeqError(f"--plan is supported for the gguf format (got {opts.format})")
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
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    target = load_target(opts.target)
    if opts.format is None:
        opts = dataclasses.replace(opts, format=next((f.value for f in target.formats if f.value in FORMATS), "gguf"))
    check_options(opts, target)
    bits = opts.bits if opts.bits is not None else target.default_bits
    t = time.perf_counter()
    ir = prepare_ir(opts, log)
    timings["load"] = time.perf_counter() - t
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
        if plan is not None:
            manifest, ref_ir = _lower_gguf_planned(ir, float_ir, plan, opts, target, tmp, log)
        elif opts.format == "gguf":
            manifest, ref_ir = _lower_gguf(ir, opts, target, bits, tmp, log)
        elif opts.format == "onnx":
            manifest, ref_ir = _lower_onnx(ir, opts, target, bits, tmp, log)
        elif opts.format == "tvm":
            manifest, ref_ir = _lower_tvm(ir, opts, target, bits, tmp, log)
        else:
            manifest, ref_ir = _lower_reference(ir, opts, target, tmp, log)
        timings["lower"] = time.perf_counter() - t
        manifest.update({
            "target": target.name,
            "options": opts.to_json(),
            "source": dict(ir.source),
            "adapters": {k: dict(v) for k, v in ir.adapters.items()},
            "hparams": ir.hparams.to_json(),
            "history": [{"name": r.name, "options": dict(r.options)} for r in ir.history],
        })
        if opts.record_goldens and not _runs_here(manifest):
            log(f"not recording goldens: a {manifest['format']} artifact for {target.name} does not run on this host")
        elif opts.record_goldens:
            t = time.perf_counter()
            log("recording goldens (fp32 reference and the artifact)")
            manifest["goldens"] = record_goldens(ref_ir, tmp, manifest)
            timings["goldens"] = time.perf_counter() - t
        manifest = write_manifest(tmp, manifest)
    total = time.perf_counter() - t_start
    return BuildResult(out=Path(opts.out), manifest=manifest, seconds=total, timings=timings)


def _lower_gguf(ir: ModelIR, opts: BuildOptions, target: TargetProfile, bits: int, tmp: Path,
                log) -> tuple[dict, ModelIR]:
    from edgeq.backends.gguf import lower as lower_gguf

    separate = opts.adapter_mode == "separate" and bool(ir.adapters)
    base = ir.without_low_rank() if separate else ir
    if ir.prune is None:
        problems = lower_gguf.check(base)
        if problems:
            raise EdgeqError(f"cannot lower to gguf: {problems[0]}")
        types = lower_gguf.tensor_types(ir, opts.qtype or bits)
        log(f"writing {MODEL_FILE} ({types[linear_name(0, Role.Q)].value}) for target {target.name}")
        lower_gguf.write_gguf(ir, tmp / MODEL_FILE, types, allow_low_rank=separate, progress=True)
        adapter_files = _write_adapter_files(ir, tmp, log) if separate else []
        manifest = {"format": "gguf", "runtime": "llamacpp", "model_file": MODEL_FILE,
                    "adapter_files": adapter_files, "weight_type": types[linear_name(0, Role.Q)].value,
                    "bits": bits, "tensor_types": {k: v.value for k, v in sorted(types.items())}}
        return manifest, ir
    from edgeq.backends.gguf.rates import gguf_prune_spec, reference_ir_for_gguf, write_gguf_rates

    log(f"writing one GGUF per pruning rate ({', '.join(f'{r:g}' for r in ir.prune.rates)})")
    files = write_gguf_rates(ir, tmp, lambda r: opts.qtype or bits, progress=True)
    spec = gguf_prune_spec(ir)
    first = tmp / files[0.0]
    types = lower_gguf.tensor_types(ir, opts.qtype or bits)
    manifest = {
        "format": "gguf", "runtime": "llamacpp", "model_file": files[0.0], "adapter_files": [],
        "weight_type": types[linear_name(0, Role.Q)].value, "bits": bits,
        "prune": {
            "rates": list(spec.rates), "files": {f"{r:g}": f for r, f in sorted(files.items())},
            "widths": spec.to_json()["widths"], "method": opts.sort, "granularity": spec.granularity,
            "planned": ir.prune.to_json(),
            "expressed": "per-layer MLP widths (llama.cpp 'deci' architecture), one file per rate, "
                         "loaded by the runtime at the requested rate (a switch is a reload)",
            "dropped": "Q/K RoPE-pair pruning and V/O component truncation (llama.cpp has one head dim and "
                       "sequential RoPE frequencies); each rate removes the same number of parameters from "
                       "the MLP instead, and the sorted Q/K pair order is undone exactly",
            "bytes_per_rate": {f"{r:g}": (tmp / f).stat().st_size for r, f in sorted(files.items())},
            "storage_overhead_vs_rate0": sum((tmp / f).stat().st_size for f in files.values())
            / first.stat().st_size,
        },
    }
    return manifest, reference_ir_for_gguf(ir)


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
    types = target.plan_types("gguf")
    probe = None
    try:
        from edgeq.quant.sensitivity import KLProbe

        n = max(1, min(opts.probe_samples, len(seqs)))
        probe = KLProbe(ir, [s[:min(len(s), 128)] for s in seqs[-n:]], threads=None)
    except EdgeqError as exc:  # torch missing: fall back to unweighted output errors
        log(f"warning: no KL sensitivity probe ({exc}); the planner weighs raw layer output errors")
    log(f"planning: {len(types)} types x ranks {list(target.plan_ranks)} for a {budget / 1e6:.2f} MB weight budget")
    plan = make_plan(ir, stats, target.name, types, target.plan_ranks, budget, probe=probe,
                     model=str(ir.source.get("name") or Path(str(ir.source.get("path", ""))).name))
    plan.summary["bpw"] = round(budget * 8 / n_weights(ir), 4)
    timings["plan"] = time.perf_counter() - t
    return plan, stats


def planner_budget(ir: ModelIR, opts: BuildOptions, target: TargetProfile) -> int:
    """Bytes for the 2-D weights (+ branches): from --budget-mb (minus the fixed overhead),
    --bpw, or the target's default bits per weight."""
    from edgeq.backends.gguf.lower import fixed_overhead_bytes
    from edgeq.plan import n_weights

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


def _lower_gguf_planned(ir: ModelIR, float_ir: ModelIR, plan, opts: BuildOptions, target: TargetProfile,
                        tmp: Path, log) -> tuple[dict, ModelIR]:
    """GGUF from a quantized IR: packed linears written as they are, compensation as a LoRA GGUF."""
    from edgeq.backends.gguf import lower as lower_gguf
    from edgeq.plan import n_weights, plan_bytes
    from edgeq.quant.apply import COMP_SOURCE, has_compensation

    separate = opts.adapter_mode == "separate" and bool(ir.adapters)
    base = ir.without_low_rank()
    problems = lower_gguf.check(base)
    if problems:
        raise EdgeqError(f"cannot lower to gguf: {problems[0]}")
    types = lower_gguf.tensor_types(ir, "F32")
    for name, c in plan.tensors.items():
        types[name] = lower_gguf.as_qtype(c.type)
    low = min((types[n] for n in ir.linears), key=lambda q: lower_gguf.FORMATS[q].bits_per_weight)
    log(f"writing {MODEL_FILE} (plan: {_type_counts(plan)}) for target {target.name}")
    lower_gguf.write_gguf(ir, tmp / MODEL_FILE, types, allow_low_rank=True, progress=True)
    (tmp / PLAN_FILE).write_text(plan.to_toml(), encoding="utf-8")
    adapter_files = []
    if has_compensation(ir):
        fname = "compensation.gguf"
        log(f"writing error-compensation branches {fname} (LoRA GGUF, F16)")
        lower_gguf.write_lora_gguf(ir, COMP_SOURCE, tmp / fname, dtype="F16")
        adapter_files.append(fname)
    if separate:
        adapter_files += _write_adapter_files(ir, tmp, log)
    files = [MODEL_FILE, *adapter_files]
    total = sum((tmp / f).stat().st_size for f in files)
    manifest = {"format": "gguf", "runtime": "llamacpp", "model_file": MODEL_FILE, "adapter_files": adapter_files,
                "weight_type": low.value, "bits": None, "plan_file": PLAN_FILE,
                "tensor_types": {k: v.value for k, v in sorted(types.items())},
                "ranks": {n: c.rank for n, c in sorted(plan.tensors.items()) if c.rank},
                "size": {"predicted_weight_bytes": plan_bytes(ir, plan),
                         "predicted_total_bytes": plan_bytes(ir, plan) + lower_gguf.fixed_overhead_bytes(ir),
                         "realised_total_bytes": total, "bpw": round(total * 8 / n_weights(ir), 4)}}
    return manifest, float_ir


def _write_adapter_files(ir: ModelIR, tmp: Path, log) -> list[str]:
    """One llama.cpp LoRA-adapter GGUF per adapter kept separate; returns the file names."""
    from edgeq.backends.gguf import lower as lower_gguf

    files = []
    for name in ir.adapters:
        fname = f"adapter-{name}.gguf"
        log(f"writing LoRA adapter {fname}")
        lower_gguf.write_lora_gguf(ir, name, tmp / fname)
        files.append(fname)
    return files


def _type_counts(plan) -> str:
    from collections import Counter

    cnt = Counter(f"{c.type}" + (f"+r{c.rank}" if c.rank else "") for c in plan.tensors.values())
    return ", ".join(f"{k} x{v}" for k, v in sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0])))


def onnx_weights(bits: int, target: TargetProfile):
    """The ONNX weight layout for ``--bits`` on ``target``: int4 / int8 groups of the profile's block
    size for the block linears (the embedding and head at int8, as llama.cpp keeps them at Q8_0 in
    its 4-bit files), or float32 throughout."""
    from edgeq.backends.onnx.lower import OnnxOptions

    if bits == 32:
        return OnnxOptions(linear=None, head=None, accuracy_level=target.onnx_accuracy_level)
    g = target.quant_block_size
    return OnnxOptions(linear=f"int{bits}_g{g}_sym", head=f"int8_g{g}_sym", accuracy_level=target.onnx_accuracy_level)


def _lower_onnx(ir: ModelIR, opts: BuildOptions, target: TargetProfile, bits: int, tmp: Path,
                log) -> tuple[dict, ModelIR]:
    from edgeq.backends.onnx import lower as lower_onnx

    weights = onnx_weights(bits, target)
    separate = opts.adapter_mode == "separate" and bool(ir.adapters)
    switchable = tuple(ir.adapters) if separate else ()
    log(f"writing {lower_onnx.MODEL_FILE} + {lower_onnx.DATA_FILE} (linears {weights.linear or 'F32'}, "
        f"embedding/head {weights.head or 'F32'}, accuracy_level {weights.accuracy_level}) for target {target.name}")
    info = lower_onnx.write_onnx(ir, tmp, weights, switchable=switchable, progress=True)
    adapter_files = {}
    for name in switchable:
        fname = f"adapter-{name}.onnx_adapter"
        log(f"writing LoRA adapter {fname} (onnxruntime adapter format)")
        lower_onnx.write_adapter(ir, name, tmp / fname, weights)
        adapter_files[name] = fname
    info["adapter_files"] = adapter_files
    weight_type = "F32" if bits == 32 else f"INT{bits}"
    manifest = {"format": "onnx", "runtime": "onnxruntime", "model_file": lower_onnx.MODEL_FILE,
                "adapter_files": sorted(adapter_files.values()), "weight_type": weight_type, "bits": bits,
                "onnx": info}
    if ir.prune is not None:
        manifest["prune"] = _switchable_prune_section(
            ir, opts, "everything, in one graph with a rate input (switched at run time, nothing reloaded): "
                      "MLP channels as per-rate segments skipped by If nodes; Q/K RoPE pairs and V/O "
                      "components as per-rate masks (the attention projections run at full width)",
            weight_bytes_per_rate=info.get("weight_bytes_per_rate"))
    return manifest, ir


def _switchable_prune_section(ir: ModelIR, opts: BuildOptions, expressed: str, **extra) -> dict:
    """The manifest's ``prune`` section of a format that carries every rate at full fidelity."""
    return {"rates": list(ir.prune.rates), "method": opts.sort, "granularity": ir.prune.granularity,
            "widths": ir.prune.to_json()["widths"], "expressed": expressed, "dropped": "nothing", **extra}


def _runs_here(manifest: dict) -> bool:
    if manifest.get("format") != "tvm":
        return True
    import platform

    t = manifest["tvm"]["target"]
    return t.get("kind") != "cuda" and str(t.get("mtriple", "x86_64")).startswith(platform.machine())


def _lower_tvm(ir: ModelIR, opts: BuildOptions, target: TargetProfile, bits: int, tmp: Path,
               log) -> tuple[dict, ModelIR]:
    from edgeq.backends.tvm import lower as lower_tvm

    if bits not in (4, 8):
        raise EdgeqError(f"the tvm format stores int4 or int8 weights; target {target.name} defaults to {bits} bits "
                         "(give --bits 4 or 8)")
    tvm_opts = lower_tvm.TvmOptions(bits=bits, group=target.quant_block_size,
                                    target=target.compile_target.as_dict())
    log(f"generating and compiling kernels for {target.name} ({tvm_opts.target}), writing "
        f"{lower_tvm.LIBRARY} + {lower_tvm.WEIGHTS} (int{bits}, group {tvm_opts.group}; head int8)")
    info = lower_tvm.write_tvm(ir, tmp, tvm_opts, progress=True)
    manifest = {"format": "tvm", "runtime": "tvm", "model_file": lower_tvm.LIBRARY, "adapter_files": [],
                "weight_type": f"INT{bits}", "bits": bits, "tvm": info}
    if ir.prune is not None:
        manifest["prune"] = _switchable_prune_section(
            ir, opts, "everything, switched at run time with nothing reloaded: MLP channels as the active "
                      "width of the kernels (one compiled function serves every width); Q/K RoPE pairs and V/O "
                      "components as per-rate masks (the attention matmuls run at full width)")
    return manifest, ir


def _lower_reference(ir: ModelIR, opts: BuildOptions, target: TargetProfile, tmp: Path,
                     log) -> tuple[dict, ModelIR]:
    from edgeq.backends.reference.ir_files import WEIGHTS, write_ir

    log(f"writing {WEIGHTS} (float32, pruning-aware layout at load) for the reference runtime")
    write_ir(ir, tmp)
    manifest = {"format": "reference", "runtime": "reference", "model_file": WEIGHTS, "adapter_files": [],
                "weight_type": "F32", "bits": 32}
    if ir.prune is not None:
        manifest["prune"] = _switchable_prune_section(
            ir, opts, "everything: MLP channels, Q/K RoPE pairs, V/O components per layer; "
                      "the rate switches at run time without copying weights")
    return manifest, ir


def record_goldens(ref_ir: ModelIR, root: Path, manifest: dict) -> dict:
    """Goldens at every carried rate: the float64 reference at that rate and the artifact."""
    from edgeq.session import artifact_rates, open_session, rate_key
    from runtimes.reference import ReferenceSession

    ref = ReferenceSession(ref_ir, n_ctx=256, dtype=np.float64)  # the oracle: float64 accumulation
    token_ids = goldens.golden_token_ids(ref)
    data = {"prompts": list(goldens.GOLDEN_PROMPTS), "token_ids": token_ids, "rates": {}}
    rates = artifact_rates(manifest)
    for rate in rates:
        ref.set_prune_rate(rate)
        data["rates"][rate_key(rate)] = {"reference": goldens.record(ref, token_ids)}
    del ref
    for rate in rates:
        with open_session(root, n_ctx=256, manifest=manifest, prune=rate) as art:
            data["rates"][rate_key(rate)]["artifact"] = goldens.record(art, token_ids)
    dump_json(data, root / GOLDENS)
    return {"file": GOLDENS, "positions": sum(len(t) for t in token_ids), "topk": goldens.GOLDEN_TOPK,
            "rates": [rate_key(r) for r in rates]}

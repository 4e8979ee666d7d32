"""The build steps: one frozen, versioned config per step of ``edgeq build``.

In build order: load the model -> attach adapters -> memory check -> [calibrate -> sort ->
rate plan -> recovery fine-tune] (structured pruning) -> [plan -> calibrate -> quantize] (planned
builds) -> lower (the backend writes the payload and its manifest section) -> goldens.
``edgeq.build.steps`` turns the options a user typed into this list; ``edgeq.pipeline.runner``
runs it. The passes a step calls still append their own records to the IR's history (what was
done to the weights, kept with the model); the manifest's ``steps`` list records the build.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq import backends, goldens, reference_check, tolerances
from edgeq.artifact import GOLDENS, dump_json
from edgeq.errors import EdgeqError
from edgeq.pipeline.runner import BuildContext, Step


@dataclass(frozen=True)
class LoadStep(Step):
    """Front end: the HF checkpoint directory or .gguf file as a ModelIR."""

    name = "load"
    model: str

    def run(self, ctx: BuildContext) -> None:
        from edgeq.frontend import load_model

        ctx.log(f"loading {self.model}")
        ctx.ir = load_model(Path(self.model))


@dataclass(frozen=True)
class AdaptersStep(Step):
    """Attach PEFT LoRA adapters; merge them into the weights unless they are kept separate."""

    name = "adapters"
    paths: tuple[str, ...]
    merge: bool

    def run(self, ctx: BuildContext) -> None:
        from edgeq.frontend import load_adapter, merge_adapters

        ir = ctx.need("ir", self)
        for path in self.paths:
            ctx.log(f"loading adapter {path}")
            ir = load_adapter(ir, Path(path))
        if self.merge and self.paths:
            ir = merge_adapters(ir)
        ctx.ir = ir


@dataclass(frozen=True)
class ChatTemplateStep(Step):
    """Attach the chat template of ``--chat-template`` (a built-in name or a file's name; the text
    itself in ``template``) to the model's tokenizer, replacing the checkpoint's own."""

    name = "chat_template"
    value: str
    template: str

    def run(self, ctx: BuildContext) -> None:
        import dataclasses

        from edgeq.chat_template import check

        ir = ctx.need("ir", self)
        if ir.tokenizer is None:
            raise EdgeqError(f"--chat-template {self.value}: the model carries no tokenizer to attach it to")
        check(self.value, self.template, ir.tokenizer.tokens)
        ctx.log(f"chat template: {self.value}")
        ctx.ir = ir.replace(tokenizer=dataclasses.replace(ir.tokenizer, chat_template=self.template))


@dataclass(frozen=True)
class CheckMemoryStep(Step):
    """Refuse before the first heavy step: a format that cannot run the model's family blocks
    (per target: a release matrix shares the load), or a later step that would not fit in memory."""

    name = "check_memory"
    checks_only = True
    format: str
    prunes: bool
    planned: bool
    recover: bool
    goldens: bool
    calib_samples: int
    calib_len: int
    probe_samples: int
    measured: bool = False  # the measured pruning allocation's KL probe (edgeq.passes.prune_sensitivity)

    def config(self) -> dict:  # (without it the manifests stay as they were)
        return {k: v for k, v in super().config().items() if k != "measured" or self.measured}

    def run(self, ctx: BuildContext) -> None:
        from edgeq.memory import calib_workers, check_build

        ir = ctx.need("ir", self)
        blocks = ir.hparams.special_blocks()
        backend = backends.find(self.format) if self.format else None
        if blocks and backend is not None and not backend.family_blocks:
            able = [b.name for b in backends.backends() if b.family_blocks]
            raise EdgeqError(f"the {backend.name} format does not support {ir.arch.value} models yet "
                             f"({', '.join(blocks)}); formats that do: {', '.join(able)}")
        why = backend.prune_refusal(ir.hparams, ctx.opts) if self.prunes and backend is not None else None
        if why:
            able = [b.name for b in backends.backends() if b.prune_refusal(ir.hparams, ctx.opts) is None]
            raise EdgeqError(f"{why}; formats that do: {', '.join(able)}")
        workers = 1
        if self.prunes or self.planned:  # (the calibration step asks for the same number)
            workers = calib_workers(ir.hparams, self.calib_samples, self.calib_len, calibration_want(ctx))
        check_build(ir.hparams, log=ctx.log, spill_dir=Path(ctx.opts.out).resolve().parent,
                    fmt=self.format, prunes=self.prunes,
                    planned=self.planned, recover=self.recover, goldens=self.goldens,
                    calib_samples=self.calib_samples, calib_len=self.calib_len, probe_samples=self.probe_samples,
                    measured=self.measured, calib_workers=workers)


def calibration_want(ctx: BuildContext) -> int:
    """Calibration shards the build could run at a time: ``EDGEQ_THREADS`` worker threads in this
    process, or its executor's workers (``ctx.split``); the memory check may lower it."""
    from edgeq.streaming import worker_threads

    return worker_threads() if ctx.split is None else ctx.split.shard_workers()


@dataclass(frozen=True)
class CalibrateStep(Step):
    """Per-layer activation statistics on Alpaca token sequences (edgeq.calibrate)."""

    name = "calibrate"
    version = 2  # 2: sums per fixed shard of samples, added in shard order (edgeq.calibrate: Shards)
    samples: int
    seq_len: int
    data: str | None = None  # Alpaca JSON; None: the bundled data set

    def run(self, ctx: BuildContext) -> None:
        from edgeq.calibrate import SHARD_SAMPLES, alpaca_token_sequences, calibrate, shard_bounds
        from edgeq.memory import calib_workers

        ir = ctx.need("ir", self)
        seqs = alpaca_token_sequences(ir.tokenizer, path=None if self.data is None else Path(self.data),
                                      n_samples=self.samples, seq_len=self.seq_len)
        ctx.calib_seqs = seqs
        source = {"data": "alpaca", "samples": len(seqs), "seq_len": self.seq_len}
        n_shards = len(shard_bounds(len(seqs)))
        workers = calib_workers(ir.hparams, len(seqs), self.seq_len, calibration_want(ctx))
        what = f"calibrating on {len(seqs)} x {self.seq_len} Alpaca tokens: {n_shards} shards of up to {SHARD_SAMPLES}"
        if ctx.split is None or n_shards == 1:
            ctx.log(f"{what}, {workers} at a time (threads)")
            ctx.stats = calibrate(ir, seqs, source=source, workers=workers)
            return
        ctx.log(f"{what}, {workers} at a time as tasks ({ctx.split.describe()})")
        with ctx.split.open_shards(workers) as runner:
            ctx.stats = calibrate(ir, seqs, source=source, runner=runner)


@dataclass(frozen=True)
class SortStep(Step):
    """Reorder channels by importance: UniQL's sorts (calibrated), FLAP's fluctuation metric
    (calibrated; its MLP scores are kept for the fluctuation allocation) or the weight-norm baseline."""

    name = "sort"
    method: str  # uniql | flap | naive

    def run(self, ctx: BuildContext) -> None:
        from edgeq.passes import run_pass
        from edgeq.passes.naive_sort import naive_sort
        from edgeq.passes.sort_flap import FlapSortConfig, sorted_mlp_scores
        from edgeq.passes.uniql import UniQLSortConfig

        ir = ctx.need("ir", self)
        ctx.sort_scores = None
        if self.method == "naive":
            ctx.log(f"sorting ({self.method})")
            ctx.ir = naive_sort(ir)
            return
        if self.method not in ("uniql", "flap"):
            raise EdgeqError(f"unknown sort {self.method!r} (uniql, flap or naive)")
        from edgeq.memory import sort_workers
        from edgeq.streaming import allow_layer_workers

        stats = ctx.need("stats", self)
        if self.method == "flap":  # (a diagonal per channel: no factorisation to spread over threads)
            ctx.log(f"sorting ({self.method})")
            ctx.sort_scores = sorted_mlp_scores(ir, stats)
            ctx.ir = run_pass(ir, FlapSortConfig(), stats)
            return
        workers = sort_workers(ir.hparams)
        ctx.log(f"sorting ({self.method}, {workers} layer{'s' if workers > 1 else ''} at a time)")
        with allow_layer_workers(workers):
            ctx.ir = run_pass(ir, UniQLSortConfig(), stats)


@dataclass(frozen=True)
class RatePlanStep(Step):
    """Per-layer kept widths at every pruning rate (edgeq.passes.rate_plan), carried by the IR."""

    name = "rate_plan"
    rates: tuple[float, ...]  # validated, 0 first (edgeq.passes.rate_plan.check_rates)
    granularity: int
    # angular (per-layer angular distance) | uniform | measured (per-layer loss curves) | fluctuation (FLAP's scores)
    importance: str
    dims: str = "all"  # all (MLP, Q/K pairs, V/O components) | mlp (MLP channels only, same parameter rate)
    probe_samples: int = 4  # measured: calibration sequences the loss curves are measured on

    def config(self) -> dict:
        d = super().config()
        if self.dims == "all":  # (the default's manifests stay as they were)
            del d["dims"]
        if self.importance != "measured":
            del d["probe_samples"]
        return d

    def run(self, ctx: BuildContext) -> None:
        from edgeq.passes.rate_plan import apply_prune_spec, plan_rates

        ir = ctx.need("ir", self)
        if self.importance == "measured":  # per-layer MLP loss curves, solved per rate
            from edgeq.passes.prune_sensitivity import plan_measured

            spec, rec = plan_measured(ir, ctx.need("calib_seqs", self)[: self.probe_samples], self.rates,
                                      self.granularity, self.dims, log=ctx.log)
            ctx.ir = apply_prune_spec(ir, spec, measured=rec)
            return
        if self.importance == "fluctuation":  # FLAP: standardised fluctuation scores, one threshold
            from edgeq.passes.prune_alloc import fluctuation_curves, mlp_grid, plan_rates_measured

            if self.dims != "mlp":
                raise EdgeqError("the fluctuation allocation prunes MLP channels only (dims='mlp')")
            if ctx.sort_scores is None:
                raise EdgeqError("the fluctuation allocation needs the FLAP sort's channel scores (sort 'flap')")
            curves = fluctuation_curves(ctx.sort_scores, mlp_grid(ir.hparams, self.granularity))
            ctx.ir = apply_prune_spec(ir, plan_rates_measured(ir, self.rates, self.granularity, curves,
                                                              importance="fluctuation"))
            return
        angular = None
        if self.importance == "angular":
            angular = np.array([layer.angular for layer in ctx.need("stats", self).layers])
        spec = plan_rates(ir, self.rates, granularity=self.granularity, importance=angular, mode=self.importance,
                          dims=self.dims)
        ctx.ir = apply_prune_spec(ir, spec)


@dataclass(frozen=True)
class PruneBiasStep(Step):
    """Bias compensation (edgeq.passes.prune_bias): attach the mean inputs of o_proj / ffn_down so
    each rate adds back the mean contribution of the inputs it prunes. ``source="calibration"``:
    the calibration's means (right after calibrating, before the sorts, which carry them into
    their column order; no extra forward); ``"measure"``: measured again at rate 0 on the model as
    it now is over the calibration sequences (after a recovery fine-tune changed it)."""

    name = "prune_bias"
    version = 2  # 2: "measure" sums per fixed shard of samples (edgeq.calibrate.collect_means)
    source: str = "calibration"  # calibration | measure

    def run(self, ctx: BuildContext) -> None:
        from edgeq.passes.prune_bias import with_prune_means

        ir, seqs = ctx.need("ir", self), ctx.need("calib_seqs", self)
        src = {"n_samples": len(seqs), "seq_len": len(seqs[0]), "source": self.source}
        if self.source == "calibration":
            stats = ctx.need("stats", self)
            if stats.source.get("history") != [r.name for r in ir.history]:
                raise EdgeqError("prune_bias: the calibration statistics were collected on another version of "
                                 "the model (a pass ran since); use source='measure'")
            ctx.log("bias compensation: the calibration's mean inputs of o_proj / ffn_down")
            ctx.ir = with_prune_means(ir, [layer.means() for layer in stats.layers], src)
        elif self.source == "measure":
            from edgeq.calibrate import collect_means

            ctx.log(f"bias compensation: measuring the mean inputs of o_proj / ffn_down over {len(seqs)} x "
                    f"{len(seqs[0])} tokens")
            ctx.ir = with_prune_means(ir, collect_means(ir, seqs), src)
        else:
            raise EdgeqError(f"prune_bias: unknown source {self.source!r} (calibration or measure)")


@dataclass(frozen=True)
class RecoverStep(Step):
    """LoRA recovery fine-tune with the pruning rate sampled per step (edgeq.passes.recover), on
    next-token cross-entropy (``loss="ce"``) or distilled from the unpruned model (``"kl"``)."""

    name = "recover"
    steps: int | None = None  # None: RecoverConfig's default
    data: str | None = None
    loss: str = "ce"  # ce | kl (distillation from the unpruned model's logits)

    def config(self) -> dict:
        d = super().config()
        if self.loss == "ce":  # (the default's manifests stay as they were)
            del d["loss"]
        return d

    def run(self, ctx: BuildContext) -> None:
        from edgeq.calibrate import alpaca_token_sequences
        from edgeq.passes.recover import RecoverConfig, recover

        ir = ctx.need("ir", self)
        cfg = RecoverConfig(loss=self.loss) if self.steps is None else RecoverConfig(steps=self.steps, loss=self.loss)
        ctx.log(f"recovery fine-tune ({cfg.steps} steps, LoRA r={cfg.rank}, {cfg.loss} loss, rate sampled per step)")
        seqs = alpaca_token_sequences(ir.tokenizer, path=None if self.data is None else Path(self.data),
                                      n_samples=max(cfg.steps, 1) * cfg.batch_size, seq_len=cfg.seq_len, seed=1)
        ctx.ir = recover(ir, seqs, cfg)


@dataclass(frozen=True)
class PlanStep(Step):
    """The per-tensor quantization plan: replayed from ``file``, or the planner's choice among the
    target's storage types that ``format`` stores, under the budget (``budget_mb``, ``bpw`` or the
    target's plan.default_bpw). The planner runs after calibration; a plan file is checked before."""

    name = "plan"
    version = 2  # 2: options carry the runtime's activation rounding (edgeq.quant.act_noise)
    format: str
    file: str | None = None
    budget_mb: float | None = None
    bpw: float | None = None
    probe_samples: int = 4
    sensitivity: str = "kl-probe"  # kl-probe (a tail re-run per tensor) | fisher (backward passes)
    min_speed: float | None = None  # decode-speed floor vs the uniform plan of the same size (edgeq.quant.speed)

    def run(self, ctx: BuildContext) -> None:
        if self.file is not None:
            ctx.plan = self._load(ctx)
        else:
            ctx.plan = self._make(ctx)

    def target_inputs(self, target, opts) -> dict:
        if self.file is not None:  # a plan file is checked against the target's name
            return {"target": target.name}
        d = {"types": list(target.plan_types(self.format)), "ranks": list(target.plan_ranks),
             "bpw": target.plan_bpw if self.bpw is None and self.budget_mb is None else None}
        if self.min_speed is not None:  # the speed model is the profile's (measured table or roofline)
            d["speed_model"] = self._speed(target).to_json() | {"bandwidth_gb_s": target.bandwidth_gb_s}
        return d

    def _speed(self, target):
        from edgeq.quant.speed import speed_model

        return speed_model(target.name, self.format, target.bandwidth_gb_s, group=target.quant_block_size)

    def adopt(self, ctx: BuildContext) -> None:
        """The planner's plan is the same for every target with these candidate types, ranks and
        budget; only its label names the target."""
        if self.file is None and ctx.plan is not None:
            import dataclasses

            ctx.plan = dataclasses.replace(ctx.plan, target=ctx.target.name, notes=dict(ctx.plan.notes),
                                           summary=dict(ctx.plan.summary))

    def _load(self, ctx: BuildContext):
        from edgeq.plan import Plan

        plan = Plan.load(Path(self.file))
        target = ctx.target
        if plan.target and plan.target != target.name:
            raise EdgeqError(f"{self.file}: plan made for target {plan.target!r}, building for {target.name!r}")
        if plan.format != self.format:
            raise EdgeqError(f"{self.file}: plan made for the {plan.format} format, building {self.format}")
        plan.check(ctx.need("ir", self), where=str(self.file))
        return plan

    def _make(self, ctx: BuildContext):
        from edgeq.memory import PROBE_MAX_BYTES, available_bytes, planner_workers, probe_bytes
        from edgeq.plan import make_plan, n_weights
        from edgeq.streaming import allow_layer_workers

        ir, stats, seqs, target = ctx.need("ir", self), ctx.need("stats", self), ctx.calib_seqs, ctx.target
        budget = self.budget(ir, target)
        types = target.plan_types(self.format)
        probe = None
        need, avail = probe_bytes(ir.hparams, self.probe_samples, self.sensitivity), available_bytes()
        if need > min(avail, PROBE_MAX_BYTES):  # the probe holds the whole model in torch: small models only
            ctx.log(f"note: the whole-model {self.sensitivity} sensitivity probe would need ~{need / 1e9:.1f} GB (used up to "
                    f"{PROBE_MAX_BYTES / 1e9:.1f} GB); the planner weighs each tensor's layer output error instead")
        else:
            try:
                from edgeq.quant.sensitivity import KLProbe

                n = max(1, min(self.probe_samples, len(seqs)))
                probe = KLProbe(ir, [s[:min(len(s), 128)] for s in seqs[-n:]], threads=None)
            except EdgeqError as exc:  # torch missing: fall back to unweighted output errors
                ctx.log(f"warning: no KL sensitivity probe ({exc}); the planner weighs raw layer output errors")
        ctx.log(f"planning: {len(types)} types x ranks {list(target.plan_ranks)} for a {budget / 1e6:.2f} MB "
                "weight budget")
        speed = None
        if self.min_speed is not None:
            speed = self._speed(target)
            ctx.log(f"speed floor: {self.min_speed:g}x the uniform plan of the same size ({speed.source} costs of "
                    f"{speed.profile}/{speed.backend})")
        backend = backends.get(self.format)
        from edgeq.plan import plan_activations

        activations = plan_activations(target.kind.value)
        workers = planner_workers(ir.hparams)
        if workers > 1:
            ctx.log(f"measuring {workers} linears at a time")
        with allow_layer_workers(workers):
            plan = make_plan(ir, stats, target.name, types, target.plan_ranks, budget, probe=probe,
                             format=self.format, model=str(ir.source.get("name") or Path(str(ir.source.get("path", ""))).name),
                             sensitivity=self.sensitivity, speed=speed, min_speed=self.min_speed,
                             uniform=lambda t: backend.uniform_plan(ir, t), activations=activations)
        plan.summary["bpw"] = round(budget * 8 / n_weights(ir), 4)
        plan.summary["activations"] = activations
        plan.summary["sensitivity"] = self.sensitivity if probe is not None else "layer-output-error"
        return plan

    def budget(self, ir, target) -> int:
        """Bytes for the 2-D weights (+ branches): from --budget-mb (minus the fixed overhead),
        --bpw, or the target's default bits per weight."""
        from edgeq.plan import n_weights

        fixed_overhead_bytes = backends.get(self.format).fixed_overhead_bytes
        if self.budget_mb is not None:
            budget = int(self.budget_mb * 1e6) - fixed_overhead_bytes(ir)
            if budget <= 0:
                raise EdgeqError(f"--budget-mb {self.budget_mb} does not even cover the file overhead "
                                 f"({fixed_overhead_bytes(ir) / 1e6:.2f} MB)")
            return budget
        bpw = self.bpw if self.bpw is not None else target.plan_bpw
        if bpw is None:
            raise EdgeqError(f"target {target.name} has no plan.default_bpw; pass --bpw or --budget-mb")
        return int(bpw * n_weights(ir) / 8)


@dataclass(frozen=True)
class QuantizeStep(Step):
    """Quantize every planned tensor (the plan's quantizer; error compensation where rank > 0)."""

    name = "quantize"

    def run(self, ctx: BuildContext) -> None:
        from edgeq.quant.apply import quantize_ir

        plan = ctx.need("plan", self)
        ctx.float_ir = ctx.need("ir", self)
        ctx.log(f"quantizing ({plan.quantizer}, compensation {plan.compensation} where rank > 0)")
        if ctx.split is None:
            ctx.ir = quantize_ir(ctx.float_ir, plan, ctx.need("stats", self))
            return
        ctx.log(f"quantizing a layer's linears as one task each ({ctx.split.describe()})")
        with ctx.split.open() as runner:
            ctx.ir = quantize_ir(ctx.float_ir, plan, ctx.need("stats", self), runner=runner)


@dataclass(frozen=True)
class LowerStep(Step):
    """The backend of ``format`` writes the payload; the manifest gets its section and the build's."""

    name = "lower"
    writes_artifact = True
    format: str

    def target_inputs(self, target, opts) -> dict:
        return {"target": target.to_json(), "options": opts.to_json()}

    def run(self, ctx: BuildContext) -> None:
        ir, opts, target = ctx.need("ir", self), ctx.opts, ctx.target
        manifest, ctx.ref_ir = backends.get(self.format).lower(ir, opts, target, ctx.tmp, ctx.log, plan=ctx.plan,
                                                               float_ir=ir if ctx.float_ir is None else ctx.float_ir)
        manifest.update({
            "target": target.name,
            "options": opts.to_json(),
            "source": dict(ir.source),
            "adapters": {k: dict(v) for k, v in ir.adapters.items()},
            "hparams": ir.hparams.to_json(),
            "history": [{"name": r.name, "options": dict(r.options)} for r in ir.history],
        })
        ctx.manifest = manifest


@dataclass(frozen=True)
class GoldensStep(Step):
    """Reference and artifact log-probabilities on the golden prompts (when the artifact runs here)."""

    name = "goldens"
    writes_artifact = True

    def target_inputs(self, target, opts) -> dict:
        return {"target": target.to_json()}

    def run(self, ctx: BuildContext) -> None:
        manifest = ctx.need("manifest", self)
        if not backends.for_manifest(manifest).runs_here(manifest):
            ctx.log(f"not recording goldens: a {manifest['format']} artifact for {ctx.target.name} does not run "
                    "on this host")
            return
        ctx.log("recording goldens (fp32 reference and the artifact)")
        manifest["goldens"] = record_goldens(ctx.need("ref_ir", self), ctx.tmp, manifest, ctx.target)


def record_goldens(ref_ir, root: Path, manifest: dict, target) -> dict:
    """Goldens at every carried rate: the float reference at that rate and the artifact.

    The reference runs layer by layer (``runtimes.reference.streamed_logits``: one layer's
    weights in memory at a time, float64 arithmetic up to ~3B shapes, float32 above:
    ``streamed_dtype``), so recording goldens is bounded by a layer whatever the model's size;
    the artifact runs with its backend's ``golden_options``."""
    from edgeq.session import artifact_rates, open_session, rate_key
    from runtimes.reference import streamed_dtype, streamed_logits
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
    options = backends.for_manifest(manifest).golden_options(root, manifest)
    tol = tolerances.REFERENCE_TOLERANCE.get(manifest.get("weight_type", ""))
    rounding = reference_check.format_rounding(manifest.get("weight_type"), target)
    for rate in rates:
        entry = data["rates"][rate_key(rate)]
        with open_session(root, n_ctx=256, manifest=manifest, prune=rate, options=options) as art:
            lps = goldens.logprobs(art, token_ids)
        entry["artifact"] = goldens.record_logprobs(lps)
        if tol is None:
            continue
        ref = goldens.compare(entry["reference"], lps, clear_margin=tolerances.TOP1_CLEAR_MARGIN)
        if rounding is not None and reference_check.problems(ref, tol, "", ""):  # is it the model? (reference_check)
            floor_ir = reference_check.rounded_ir(ref_ir, rounding)
            lps_f = [goldens.log_softmax(lg) for lg in streamed_logits(floor_ir, token_ids, rate)]
            entry["reference_floor"] = reference_check.floor_entry(
                goldens.compare(entry["reference"], lps_f, clear_margin=tolerances.TOP1_CLEAR_MARGIN),
                manifest.get("weight_type"))
    dump_json(data, root / GOLDENS)
    extra = {"session_options": options} if options else {}
    return {"file": GOLDENS, "positions": sum(len(t) for t in token_ids), "topk": goldens.GOLDEN_TOPK,
            "rates": [rate_key(r) for r in rates], **extra,
            "reference": {"runtime": "reference", "weights": "float32", "arithmetic": streamed_dtype(ref_ir).name,
                          "mode": "layer by layer"}}

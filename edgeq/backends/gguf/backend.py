"""The gguf backend: llama.cpp files (lower.py writes and reads them; rates.py: one file per
pruning rate, llama.cpp's 'deci' architecture), run by llama-cpp-python or the reference runtime."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from edgeq.backends.base import Backend
from edgeq.errors import EdgeqError
from edgeq.quant import storage

MODEL_FILE = "model.gguf"
PLAN_FILE = "plan.toml"
COMPENSATION_FILE = "compensation.gguf"
# Above this many bytes of model file, goldens (and verify, which reruns them) run llama.cpp on the
# mapped file without its CPU repack: the repack keeps a second, interleaved copy of every Q4_0 /
# IQ4_NL weight in anonymous memory (4.4 GB for an 8B Q4_0 model), doubling the build's peak. A
# device's own runs keep llama.cpp's default (repacked) layout.
GOLDENS_REPACK_MAX_BYTES = 2 * 1024 ** 3
# Fewest bits per weight of any type edgeq writes (Q2_K: 2.625), for the memory estimate: a model
# whose smallest possible file is over GOLDENS_REPACK_MAX_BYTES is never repacked for its goldens.
MIN_BITS_PER_WEIGHT = 2.5
PRUNE_EXPRESSED = ("per-layer MLP widths (llama.cpp 'deci' architecture), one file per rate, "
                   "loaded by the runtime at the requested rate (a switch is a reload)")
PRUNE_BIAS = ("per-rate bias compensation of ffn_down (the pruned MLP channels' mean contribution) written "
              "as the ffn_down.bias of each rate's file (llama.cpp's llama / deci load it)")
PRUNE_ONE_WIDTH = ("one MLP width for every layer at each rate (the family's own llama.cpp architecture, whose "
                   "layers all take its one feed_forward_length), one file per rate, loaded by the runtime at "
                   "the requested rate (a switch is a reload)")
PRUNE_ONE_WIDTH_DROPPED = ("the per-layer MLP allocation: each rate keeps the mean of the planned widths "
                           "(rounded to the granularity) in every layer")
PRUNE_DROPPED = ("Q/K RoPE-pair pruning and V/O component truncation (llama.cpp has one head dim and "
                 "sequential RoPE frequencies); each rate removes the same number of parameters from "
                 "the MLP instead, and the sorted Q/K pair order is undone exactly")


class GgufBackend(Backend):
    name = "gguf"
    summary = "llama.cpp"
    runtime = "llamacpp"
    runtimes = ("llamacpp", "reference")
    session_name = "llama.cpp"
    plans = True
    family_blocks = True  # llama.cpp's gemma3 graph (edgeq.backends.gguf.check: what it cannot run)
    # a rate file is the family's own architecture with a smaller feed_forward_length where every layer has
    # one width (prune_refusal says when it cannot be)
    prunes_family_blocks = True
    int8_runtimes = ("llamacpp",)
    no_breakdown = ("llama-cpp-python exposes no per-op or per-layer timings (only whole-call totals: "
                    "prompt eval and eval time), so no breakdown is reported for GGUF artifacts")

    def prune_refusal(self, hp, opts=None):
        """Per-layer MLP widths are written as llama.cpp's 'deci' (the Llama forward). A family whose
        blocks no per-layer-width architecture computes (its table's ``gguf_rates_refusal``) gets
        one width for every layer at each rate (rates.gguf_prune_spec), in its own architecture,
        which loads no ``ffn_down`` bias: ``--prune-bias`` is refused for it."""
        from edgeq.families import family

        why = family(hp.arch).gguf_rates_refusal
        if why and (opts is None or getattr(opts, "prune_bias", False)):
            return (f"per-rate bias compensation (--prune-bias) in the gguf format cannot express {hp.arch.value} "
                    f"models: {why}")
        return super().prune_refusal(hp, opts)

    def check_options(self, opts, target) -> None:
        if opts.qtype:  # a type the gguf backend stores (the storage registry); --bits is build's check
            storage.check_storable([opts.qtype], self.name, "--qtype: ")

    def default_options(self, opts, target) -> dict:
        d = super().default_options(opts, target)
        d["qtype"] = opts.qtype or d["bits"]  # the base weight type: explicit, or from the bits
        return d

    def fixed_overhead_bytes(self, ir) -> int:
        from edgeq.backends.gguf.lower import fixed_overhead_bytes

        return fixed_overhead_bytes(ir)

    def uniform_plan(self, ir, base_type: str) -> dict[str, str]:
        """llama.cpp's own file of that base type: its linears in ``base_type``, the head (tied
        embedding) per llama.cpp's output rule (edgeq.backends.gguf.types.tensor_types)."""
        from edgeq.backends.gguf.lower import tensor_types
        from edgeq.ir import weight_matrix_shapes

        types = tensor_types(ir, base_type)
        return {n: types[n].value for n in weight_matrix_shapes(ir.hparams)}

    def lower(self, ir, opts, target, tmp, log, *, plan=None, float_ir=None):
        if plan is not None:
            return self._lower_planned(ir, float_ir, plan, opts, target, tmp, log)
        if ir.prune is not None:
            return self._lower_rates(ir, opts, target, tmp, log)
        from edgeq.backends.gguf import lower as lower_gguf
        from edgeq.ir import Role, linear_name

        d = self.default_options(opts, target)
        separate = opts.adapter_mode == "separate" and bool(ir.adapters)
        base = ir.without_low_rank() if separate else ir
        problems = lower_gguf.check(base)
        if problems:
            raise EdgeqError(f"cannot lower to gguf: {problems[0]}")
        types = lower_gguf.tensor_types(ir, d["qtype"])
        log(f"writing {MODEL_FILE} ({types[linear_name(0, Role.Q)].value}) for target {target.name}")
        lower_gguf.write_gguf(ir, tmp / MODEL_FILE, types, allow_low_rank=separate, progress=True)
        adapter_files = write_adapter_files(ir, tmp, log) if separate else []
        manifest = self.manifest(MODEL_FILE, types[linear_name(0, Role.Q)].value, d["bits"], adapter_files,
                                 tensor_types={k: v.value for k, v in sorted(types.items())})
        return manifest, ir

    def _lower_rates(self, ir, opts, target, tmp, log):
        """One GGUF per carried pruning rate (MLP widths only; see rates.py)."""
        from edgeq.backends.gguf.lower import tensor_types
        from edgeq.backends.gguf.rates import (gguf_prune_spec, one_width_per_rate, reference_ir_for_gguf,
                                               write_gguf_rates)
        from edgeq.ir import Role, linear_name

        d = self.default_options(opts, target)
        log(f"writing one GGUF per pruning rate ({', '.join(f'{r:g}' for r in ir.prune.rates)})")
        files = write_gguf_rates(ir, tmp, lambda r: d["qtype"], progress=True)
        spec = gguf_prune_spec(ir)
        one_width = one_width_per_rate(ir.arch)
        first = tmp / files[0.0]
        types = tensor_types(ir, d["qtype"])
        manifest = self.manifest(files[0.0], types[linear_name(0, Role.Q)].value, d["bits"], prune={
            "rates": list(spec.rates), "files": {f"{r:g}": f for r, f in sorted(files.items())},
            "widths": spec.to_json()["widths"], "method": opts.sort, "granularity": spec.granularity,
            "planned": ir.prune.to_json(),
            "dropped": PRUNE_DROPPED + (f"; {PRUNE_ONE_WIDTH_DROPPED}" if one_width else ""),
            "expressed": (PRUNE_ONE_WIDTH if one_width else PRUNE_EXPRESSED) + (f"; {PRUNE_BIAS}" if ir.prune_means else ""),
            **({"bias": PRUNE_BIAS} if ir.prune_means else {}),
            "bytes_per_rate": {f"{r:g}": (tmp / f).stat().st_size for r, f in sorted(files.items())},
            "storage_overhead_vs_rate0": sum((tmp / f).stat().st_size for f in files.values())
            / first.stat().st_size,
        })
        return manifest, reference_ir_for_gguf(ir)

    def _lower_planned(self, ir, float_ir, plan, opts, target, tmp, log):
        """GGUF from a quantized IR: packed linears written as they are, compensation as a LoRA GGUF."""
        from edgeq.backends.gguf import lower as lower_gguf
        from edgeq.plan import n_weights, plan_bytes
        from edgeq.quant.apply import COMP_SOURCE, has_compensation

        separate = opts.adapter_mode == "separate" and bool(ir.adapters)
        problems = lower_gguf.check(ir.without_low_rank())
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
            log(f"writing error-compensation branches {COMPENSATION_FILE} (LoRA GGUF, F16)")
            lower_gguf.write_lora_gguf(ir, COMP_SOURCE, tmp / COMPENSATION_FILE, dtype="F16")
            adapter_files.append(COMPENSATION_FILE)
        if separate:
            adapter_files += write_adapter_files(ir, tmp, log)
        total = sum((tmp / f).stat().st_size for f in [MODEL_FILE, *adapter_files])
        manifest = self.manifest(
            MODEL_FILE, low.value, None, adapter_files, plan_file=PLAN_FILE,
            tensor_types={k: v.value for k, v in sorted(types.items())},
            ranks={n: c.rank for n, c in sorted(plan.tensors.items()) if c.rank},
            size={"predicted_weight_bytes": plan_bytes(ir, plan),
                  "predicted_total_bytes": plan_bytes(ir, plan) + lower_gguf.fixed_overhead_bytes(ir),
                  "realised_total_bytes": total, "bpw": round(total * 8 / n_weights(ir), 4)})
        return manifest, float_ir

    def golden_options(self, root, manifest) -> dict:
        from edgeq.artifact import artifact_path, gguf_file_for_rate

        rates = (manifest.get("prune") or {}).get("rates") or [0.0]
        largest = max(artifact_path(root, gguf_file_for_rate(manifest, float(r))).stat().st_size for r in rates)
        return {"repack": False} if largest > GOLDENS_REPACK_MAX_BYTES else {}

    def goldens_run_bytes(self, hp) -> int:
        from edgeq.backends.base import run_buffers_bytes, weight_copy_bytes

        # llama.cpp's repack copies the file's weights, for files up to GOLDENS_REPACK_MAX_BYTES
        return run_buffers_bytes(hp) + weight_copy_bytes(hp, MIN_BITS_PER_WEIGHT, GOLDENS_REPACK_MAX_BYTES)

    def open_session(self, root, manifest, runtime, n_ctx, threads, rate, options=None):
        from edgeq.artifact import artifact_path, gguf_file_for_rate

        options = dict(options or {})
        repack = options.pop("repack", True)
        if options or not isinstance(repack, bool):
            raise EdgeqError(f"unknown llama.cpp session options {sorted(options) or {'repack': repack}}")
        model = artifact_path(root, gguf_file_for_rate(manifest, rate))
        if runtime in ("auto", "llamacpp"):
            from runtimes.llamacpp import LlamaCppSession

            return LlamaCppSession(model, lora_paths=[artifact_path(root, f) for f in manifest.get("adapter_files", [])],
                                   n_ctx=n_ctx, n_threads=threads, repack=repack)
        if manifest.get("adapter_files"):
            raise EdgeqError("the reference runtime does not load separate LoRA-adapter GGUFs; "
                             "use --runtime llamacpp or build with --adapter-mode merge")
        from edgeq.backends.gguf.lower import read_gguf
        from runtimes.reference import ReferenceSession

        return ReferenceSession(read_gguf(model), n_ctx=n_ctx)


def write_adapter_files(ir, tmp: Path, log) -> list[str]:
    """One llama.cpp LoRA-adapter GGUF per adapter kept separate; returns the file names."""
    from edgeq.backends.gguf.lower import write_lora_gguf

    files = []
    for name in ir.adapters:
        fname = f"adapter-{name}.gguf"
        log(f"writing LoRA adapter {fname}")
        write_lora_gguf(ir, name, tmp / fname)
        files.append(fname)
    return files


def _type_counts(plan) -> str:
    cnt = Counter(f"{c.type}" + (f"+r{c.rank}" if c.rank else "") for c in plan.tensors.values())
    return ", ".join(f"{k} x{v}" for k, v in sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0])))

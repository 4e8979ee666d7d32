"""The reference backend: the float32 ModelIR as files (ir_files.py: safetensors + JSON), run by the
numpy reference runtime, which switches every pruning rate at run time. Built for any target."""
from __future__ import annotations

from edgeq.backends.base import PRUNE_QK_NORM, Backend, switchable_prune_section
from edgeq.errors import EdgeqError
from edgeq.quant import storage

PRUNE_EXPRESSED = ("everything: MLP channels, Q/K RoPE pairs, V/O components per layer; "
                   "the rate switches at run time without copying weights")


PRUNE_BIAS = ("per-rate bias compensation of o_proj / ffn_down: the runtime computes each rate's vectors "
              "from the stored mean inputs when it opens the model and selects them with the rate")


class ReferenceBackend(Backend):
    name = "reference"
    summary = "float32, numpy runtime, run-time rate switch"
    runtime = "reference"
    runtimes = ("reference",)
    on_every_target = True
    switches_in_place = True
    family_blocks = True
    prunes_family_blocks = True  # the runtime's LayerWeights / layer_forward take any widths

    def check_options(self, opts, target) -> None:
        if opts.qtype or (opts.bits is not None and opts.bits not in storage.bits_choices(self.name)):
            raise EdgeqError("the reference format stores float32 weights; drop --bits/--qtype")

    def default_options(self, opts, target) -> dict:
        return {"bits": storage.bits_choices(self.name)[0]}  # 32: F32, its one storage type

    def lower(self, ir, opts, target, tmp, log, *, plan=None, float_ir=None):
        from edgeq.backends.reference.ir_files import WEIGHTS, write_ir

        log(f"writing {WEIGHTS} (float32, in the runtime's pruning-aware layout) for the reference runtime")
        write_ir(ir, tmp)
        bits = self.default_options(opts, target)["bits"]
        manifest = self.manifest(WEIGHTS, storage.for_bits(self.name, bits).name, bits)
        if ir.prune is not None:
            expressed = PRUNE_EXPRESSED if not ir.hparams.qk_norm else \
                f"MLP channels per layer ({PRUNE_QK_NORM}); the rate switches at run time without copying weights"
            manifest["prune"] = switchable_prune_section(ir, opts, expressed, bias=PRUNE_BIAS)
        return manifest, ir

    def open_session(self, root, manifest, runtime, n_ctx, threads, rate, options=None):
        from edgeq.artifact import artifact_path, check_rate
        from edgeq.backends.reference.ir_files import META, WEIGHTS, open_ir
        from runtimes.reference import ReferenceSession

        check_rate(manifest, rate)
        for name in (WEIGHTS, META):  # fixed names, but either could be a symlink leaving the artifact
            artifact_path(root, name)
        ir, laid_out = open_ir(root)  # memory-mapped: format-2 weights are used in place
        s = ReferenceSession(ir, n_ctx=n_ctx, laid_out=laid_out)
        s.set_prune_rate(rate)
        return s

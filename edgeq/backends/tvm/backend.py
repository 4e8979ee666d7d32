"""The tvm backend: int4/int8 kernels generated and compiled for the target (TVM TensorIR, fused
low-rank branches) + a safetensors weight file, run by the TVM runtime (lower.py)."""
from __future__ import annotations

import platform

from edgeq.backends.base import PRUNE_QK_NORM, Backend, switchable_prune_section
from edgeq.errors import EdgeqError
from edgeq.quant import storage

PRUNE_EXPRESSED = ("everything, switched at run time with nothing reloaded: MLP channels as the active "
                   "width of the kernels (one compiled function serves every width); Q/K RoPE pairs and V/O "
                   "components as per-rate masks (the attention matmuls run at full width)")
# a QK-norm model (Gemma 3) prunes its MLP channels only (--prune-dims mlp; the rate plan refuses more)
PRUNE_EXPRESSED_QK_NORM = ("MLP channels per layer as the active width of the kernels (one compiled function "
                           "serves every width), switched at run time with nothing reloaded; " + PRUNE_QK_NORM)
PRUNE_BIAS = ("per-rate bias compensation of o_proj / ffn_down: (rates, hidden) vectors per layer in the "
              "weights file, the rate's row added by the runtime's numpy decoder after the o / down kernels")


class TvmBackend(Backend):
    name = "tvm"
    summary = "generated kernels with fused low-rank branches"
    runtime = "tvm"
    runtimes = ("tvm",)
    section = "tvm"
    switches_in_place = True
    family_blocks = True  # Gemma 3's blocks (the runtime's numpy decoder, runtimes/tvmrt.py)
    prunes_family_blocks = True  # the same decoder at the rate's active MLP width (GeGLU included)

    def check_options(self, opts, target) -> None:
        bits = storage.or_list(storage.bits_choices(self.name))  # 4 or 8 (INT4, INT8 in the storage registry)
        if opts.qtype:
            raise EdgeqError(f"--qtype names a GGUF type; the tvm format takes --bits {bits}")
        if opts.bits is not None and opts.bits not in storage.bits_choices(self.name):
            raise EdgeqError(f"the tvm format stores int4 or int8 weights (generated kernels): --bits {bits}")

    def default_options(self, opts, target) -> dict:
        from edgeq.backends.tvm.lower import TvmOptions

        d = super().default_options(opts, target)
        bits = d["bits"]
        if bits not in storage.bits_choices(self.name):
            raise EdgeqError(f"the tvm format stores int4 or int8 weights; target {target.name} defaults to {bits} "
                             f"bits (give --bits {storage.or_list(storage.bits_choices(self.name))})")
        d["tvm"] = TvmOptions(bits=bits, group=target.quant_block_size, target=target.compile_target.as_dict(),
                              act=opts.tvm_activations or target.tvm_activations)
        return d

    def lower(self, ir, opts, target, tmp, log, *, plan=None, float_ir=None):
        from edgeq.backends.tvm import lower as lower_tvm

        d = self.default_options(opts, target)
        bits, tvm_opts = d["bits"], d["tvm"]
        log(f"generating and compiling kernels for {target.name} ({tvm_opts.target}), writing "
            f"{lower_tvm.LIBRARY} + {lower_tvm.WEIGHTS} (int{bits}, group {tvm_opts.group}; head int8; "
            f"{tvm_opts.act} activations)")
        info = lower_tvm.write_tvm(ir, tmp, tvm_opts, progress=True)
        manifest = self.manifest(lower_tvm.LIBRARY, storage.for_bits(self.name, bits).name, bits, tvm=info)
        if ir.prune is not None:
            expressed = PRUNE_EXPRESSED_QK_NORM if ir.hparams.qk_norm else PRUNE_EXPRESSED
            manifest["prune"] = switchable_prune_section(ir, opts, expressed, bias=PRUNE_BIAS)
        return manifest, ir

    def runs_here(self, manifest: dict) -> bool:
        t = manifest["tvm"]["target"]
        return t.get("kind") != "cuda" and str(t.get("mtriple", "x86_64")).startswith(platform.machine())

    def device(self, manifest: dict) -> str | None:
        t = manifest.get("tvm", {}).get("target")
        return None if t is None else f"{t.get('kind')} {t.get('arch') or t.get('mtriple', '')}"

    def open_session(self, root, manifest, runtime, n_ctx, threads, rate, options=None):
        from edgeq.artifact import check_rate
        from runtimes.tvmrt import TvmSession, runtime_only

        runtime_only()
        check_rate(manifest, rate)
        return TvmSession(root, manifest=manifest, n_ctx=n_ctx, threads=threads, prune=rate)

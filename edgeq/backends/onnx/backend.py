"""The onnx backend: one ONNX graph (MatMulNBits int4/int8 or float32 weights, GroupQueryAttention
with a KV cache, every pruning rate behind a rate input) run by onnxruntime (lower.py, graph.py)."""
from __future__ import annotations

from edgeq.backends.base import PRUNE_QK_NORM, Backend, switchable_prune_section
from edgeq.errors import EdgeqError
from edgeq.quant import storage

# Goldens of an artifact whose weight file is larger than this run onnxruntime without its weight
# prepacking (``session.disable_prepacking``): prepacking makes a private copy of every MatMulNBits
# weight (~ the data file in anonymous memory: 6.3 GB at the 8B shape) on top of the memory-mapped
# file; without it MatMulNBits dequantizes one weight at a time while the file stays mapped.
# A fixed size, not the host's free memory, so the same inputs still give the same goldens.
GOLDENS_PREPACK_MAX_BYTES = 2 * 1024 ** 3
# Fewest bits per weight of an ONNX weight layout (int4 groups, scales on top), for the memory estimate.
MIN_BITS_PER_WEIGHT = 4.0

PRUNE_EXPRESSED = ("everything, in one graph with a rate input (switched at run time, nothing reloaded): "
                   "MLP channels as {mlp}; Q/K RoPE pairs and V/O components as per-rate masks (the "
                   "attention projections run at full width)")
# a QK-norm model (Gemma 3) prunes its MLP channels only (--prune-dims mlp; the rate plan refuses more)
PRUNE_EXPRESSED_QK_NORM = ("MLP channels per layer as {mlp}, in one graph with a rate input (switched at run "
                           "time, nothing reloaded); " + PRUNE_QK_NORM)
PRUNE_MLP = {"mask": "per-rate masks on the {glu} output (the MLP matmuls run at full width, as fast as a "
                     "1-rate graph at rate 0)",
             "segments": "per-rate segments skipped by If nodes"}
PRUNE_BIAS = ("per-rate bias compensation of o_proj / ffn_down: a (rates, hidden) table per layer and "
              "projection, its row selected by the rate_index input (Gather) and added")


def onnx_weights(bits: int, target):
    """The ONNX weight layout for ``--bits`` on ``target``: int4 / int8 groups of the profile's block
    size for the block linears (the embedding and head at int8, as llama.cpp keeps them at Q8_0 in
    its 4-bit files), or float32 throughout."""
    from edgeq.backends.onnx.lower import OnnxOptions

    t = storage.for_bits("onnx", bits)
    if not t.quantized:
        return OnnxOptions(linear=None, head=None, accuracy_level=target.onnx_accuracy_level)
    g = target.quant_block_size
    return OnnxOptions(linear=t.codec_name(g), head=storage.get("INT8").codec_name(g),
                       accuracy_level=target.onnx_accuracy_level)


class OnnxBackend(Backend):
    name = "onnx"
    summary = "onnxruntime, MatMulNBits"
    runtime = "onnxruntime"
    runtimes = ("onnxruntime",)
    section = "onnx"
    switches_in_place = True
    int8_runtimes = ("onnxruntime",)
    family_blocks = True  # Gemma 3's blocks (edgeq.backends.onnx.blocks)
    prunes_family_blocks = True  # the multi-rate graph is the same decoder: its MLP masks / segments take any act

    def check_options(self, opts, target) -> None:
        bits = storage.bits_choices(self.name)  # 4, 8, 32 (INT4, INT8, F32 in the storage registry)
        if opts.qtype:
            raise EdgeqError(f"--qtype names a GGUF type; the onnx format takes --bits {storage.or_list(bits)}")
        if opts.bits is not None and opts.bits not in bits:
            raise EdgeqError("the onnx format stores int4/int8 (MatMulNBits) or float32 weights: "
                             f"--bits {storage.or_list(bits)}")

    def default_options(self, opts, target) -> dict:
        d = super().default_options(opts, target)
        d["weights"] = onnx_weights(d["bits"], target)
        return d

    def lower(self, ir, opts, target, tmp, log, *, plan=None, float_ir=None):
        from edgeq.backends.onnx import lower as lower_onnx

        d = self.default_options(opts, target)
        bits, weights = d["bits"], d["weights"]
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
        manifest = self.manifest(lower_onnx.MODEL_FILE, storage.for_bits(self.name, bits).name, bits,
                                 sorted(adapter_files.values()), onnx=info)
        if ir.prune is not None:
            glu = "SwiGLU" if ir.hparams.hidden_act == "silu" else "GeGLU"
            mlp = PRUNE_MLP[weights.ffn_rates].format(glu=glu)
            expressed = (PRUNE_EXPRESSED_QK_NORM if ir.hparams.qk_norm else PRUNE_EXPRESSED).format(mlp=mlp)
            manifest["prune"] = switchable_prune_section(ir, opts, expressed, bias=PRUNE_BIAS,
                                                         weight_bytes_per_rate=info.get("weight_bytes_per_rate"))
        return manifest, ir

    def goldens_run_bytes(self, hp) -> int:
        """Prepacked (a data file up to GOLDENS_PREPACK_MAX_BYTES): a private copy of the weights;
        not prepacked: MatMulNBits dequantizes the weight of each call to float32, the largest being
        the vocabulary head's (a tied head in one call; an untied one in blocks, Decoder.head)."""
        from edgeq.backends.base import run_buffers_bytes, weight_copy_bytes
        from edgeq.backends.onnx.decoder import HEAD_CALL_MAX_BYTES
        from edgeq.ir import n_weight_params

        prepack = weight_copy_bytes(hp, MIN_BITS_PER_WEIGHT, GOLDENS_PREPACK_MAX_BYTES)
        head = 4 * hp.vocab_size * hp.hidden_size  # an untied head is split into calls of at most HEAD_CALL_MAX_BYTES
        head = head if hp.tie_word_embeddings else min(head, HEAD_CALL_MAX_BYTES)
        # not prepacked only where even the largest (8-bit) data file can pass GOLDENS_PREPACK_MAX_BYTES
        unpacked = head if n_weight_params(hp) * 8.5 / 8 > GOLDENS_PREPACK_MAX_BYTES else 0
        return run_buffers_bytes(hp) + max(prepack, unpacked)

    def golden_options(self, root, manifest) -> dict:
        from edgeq.artifact import artifact_path

        data = (manifest.get("onnx") or {}).get("data_file")
        size = artifact_path(root, data).stat().st_size if data else 0
        return {"prepack": False} if size > GOLDENS_PREPACK_MAX_BYTES else {}

    def open_session(self, root, manifest, runtime, n_ctx, threads, rate, options=None):
        from edgeq.artifact import check_rate
        from runtimes.onnxrt import OnnxSession

        options = dict(options or {})
        prepack = options.pop("prepack", True)
        if options or not isinstance(prepack, bool):
            raise EdgeqError(f"unknown onnxruntime session options {sorted(options) or {'prepack': prepack}}")
        check_rate(manifest, rate)
        return OnnxSession(root, manifest=manifest, n_ctx=n_ctx, threads=threads, prune=rate, prepack=prepack)

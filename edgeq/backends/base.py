"""The Backend interface: one artifact format (gguf, onnx, tvm, reference) as one unit.

A backend is a small object registered under its format name (see ``edgeq.backends``). It
knows everything format-specific about a build and about opening what was built:

* ``check_options(opts, target)``: reject options this format cannot honour (one ``EdgeqError``);
* ``default_options(opts, target)``: what the user left open, filled from the target profile
  (weight bits, the ONNX weight layout, the TVM kernel options ...);
* ``lower(ir, opts, target, tmp, log)``: write the payload into the temporary artifact directory
  and return ``(manifest section, reference IR)``: the format-owned part of the manifest (the
  keys of :meth:`Backend.manifest`, plus ``section`` and ``prune`` where the format has them) and
  the float IR the goldens compare against (the artifact's own view of the model);
* ``open_session(root, manifest, runtime, n_ctx, threads, rate)``: a runtime Session on a built
  artifact;
* ``runs_here(manifest)``: whether this host can run the artifact (goldens are recorded only then).

Method bodies import their lowering / runtime modules when called, so importing the registry
stays cheap (the CLI builds its choices from it) and optional dependencies (onnx, tvm,
llama-cpp-python) are needed only by the backend that uses them.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edgeq.errors import EdgeqError

if TYPE_CHECKING:  # type hints only: build.py imports the backends
    from edgeq.build import BuildOptions
    from edgeq.ir import HParams, ModelIR
    from edgeq.targets import TargetProfile

Log = Callable[[str], None]


class Backend:
    """Base class: override the attributes and the methods your format needs."""

    name: str = ""  # the --format value and the manifest's "format"
    summary: str = ""  # a few words for `edgeq build --help`: what runs it, what it stores
    runtime: str = ""  # the runtime its artifacts run on (the manifest's "runtime"; --runtime auto)
    runtimes: tuple[str, ...] = ()  # every runtime that opens its artifacts, ``runtime`` first
    session_name: str | None = None  # the ``name`` its runtime's sessions report, where not ``runtime``
    section: str | None = None  # the manifest key holding the format's own description, if any
    on_every_target: bool = False  # True: buildable for any target (profiles list the others)
    plans: bool = False  # lowers a per-tensor quantization plan (edgeq plan / --budget-mb / --bpw)
    # lowers (and its runtime runs) the family blocks beyond the Llama forward (HParams.special_blocks:
    # Gemma 3's norms, GeGLU, sliding window ...); False: such models are refused at load
    family_blocks: bool = False
    # lowers structured pruning (--prune-rates, MLP channels) of such models; False: refused at load
    # (prune_refusal says why)
    prunes_family_blocks: bool = False
    switches_in_place: bool = False  # set_prune_rate switches a carried rate without reloading
    int8_runtimes: tuple[str, ...] = ()  # runtimes that run its quantized weights through int8 dots
    no_breakdown: str = "no per-layer timings for this runtime"  # why breakdown() has nothing

    # ---- build side -----------------------------------------------------------------------
    def check_options(self, opts: BuildOptions, target: TargetProfile) -> None:
        """Raise ``EdgeqError`` for options this format cannot honour (generic checks are build's)."""

    def prune_refusal(self, hp: HParams, opts: BuildOptions | None = None) -> str | None:
        """Why this format cannot lower structured pruning (``--prune-rates``) of a model of shape
        ``hp`` built with ``opts`` (None: any options) (one line, for the build's ``error:``); None: it can."""
        blocks = hp.special_blocks()
        if blocks and not self.prunes_family_blocks:
            return (f"structured pruning (--prune-rates) in the {self.name} format does not support "
                    f"{hp.arch.value} models yet ({', '.join(blocks)})")
        return None

    def default_options(self, opts: BuildOptions, target: TargetProfile) -> dict:
        """Options the user left open, from the target profile: at least ``bits``."""
        return {"bits": opts.bits if opts.bits is not None else target.default_bits}

    def lower(self, ir: ModelIR, opts: BuildOptions, target: TargetProfile, tmp: Path, log: Log, *,
              plan=None, float_ir: ModelIR | None = None) -> tuple[dict, ModelIR]:
        """Write the payload into ``tmp``; return (manifest section, reference IR for the goldens).

        ``plan`` / ``float_ir``: a planned build (``plans`` backends only): ``ir`` is quantized
        per ``plan``, ``float_ir`` the model before quantization."""
        raise NotImplementedError

    def fixed_overhead_bytes(self, ir: ModelIR) -> int:
        """Bytes a planned artifact spends outside the planned weights (``plans`` backends)."""
        raise EdgeqError(f"the {self.name} format does not take a quantization plan")

    def uniform_plan(self, ir: ModelIR, base_type: str) -> dict[str, str]:
        """The type of every plan tensor in the one-type build of ``base_type`` (the reference of
        ``--min-speed``; ``plans`` backends): by default every 2-D weight in ``base_type``."""
        from edgeq.ir import weight_matrix_shapes

        return {n: base_type for n in weight_matrix_shapes(ir.hparams)}

    def manifest(self, model_file: str, weight_type: str, bits: int | None, adapter_files=(), **extra) -> dict:
        """The keys every format's manifest has (+ ``extra``); build adds target, options, source ..."""
        return {"format": self.name, "runtime": self.runtime, "model_file": model_file,
                "adapter_files": list(adapter_files),
                "weight_type": weight_type, "bits": bits, **extra}

    # ---- run side -------------------------------------------------------------------------
    def check_runtime(self, runtime: str) -> None:
        if runtime == "auto" or runtime in self.runtimes:
            return
        if len(self.runtimes) == 1:
            a = "an" if self.name[:1] in "aeiou" else "a"
            raise EdgeqError(f"{a} {self.name} artifact runs on the {self.runtimes[0]} runtime only")
        raise EdgeqError(f"a {self.name} artifact does not run on {runtime}")

    def open_session(self, root: Path, manifest: dict, runtime: str, n_ctx: int, threads: int, rate: float,
                     options: dict | None = None):
        """A Session on the artifact at pruning ``rate`` (``runtime`` already checked; "auto" allowed).

        ``options``: runtime settings the goldens were recorded with (:meth:`golden_options`), so
        that ``verify`` reruns the artifact the same way; formats without any ignore it."""
        raise NotImplementedError

    def golden_options(self, root: Path, manifest: dict) -> dict:
        """Runtime settings for recording (and re-checking) this artifact's goldens; {} = defaults."""
        return {}

    def goldens_run_bytes(self, hp: HParams) -> int:
        """Private memory of running the golden prompts on this format's artifact of a model of
        shape ``hp``, upper side (edgeq.memory's goldens estimate): the runtime's buffers
        (:func:`run_buffers_bytes`); the weights stay memory-mapped and are not counted. Formats
        whose runtime copies weights when it loads them (a repack, a prepack) add that."""
        return run_buffers_bytes(hp)

    def runs_here(self, manifest: dict) -> bool:
        """Whether this host can run the artifact (a cross-compiled build cannot)."""
        return True

    def device(self, manifest: dict) -> str | None:
        """The device a build was compiled for, where the artifact names one (for messages)."""
        return None

    def breakdown(self, session, steps: int) -> dict:
        """Where a decode step's time goes on ``session`` (see edgeq.breakdown)."""
        return {"available": False, "runtime": getattr(session, "name", ""), "method": self.no_breakdown}


def run_buffers_bytes(hp: HParams, n_ctx: int = 256, tokens: int = 96, batch: int = 32) -> int:
    """A runtime's working memory for the golden prompts (``tokens`` in calls of ``batch``, a
    context of ``n_ctx``) on a model of shape ``hp``, upper side: a float32 KV cache, a call's
    logits (twice) and every position's float64 log-softmax, a call's activations, and one block
    linear dequantized to float32 twice over (a kernel's temporaries)."""
    h, f = hp.hidden_size, hp.intermediate_size
    HD, KVD = hp.num_heads * hp.head_dim, hp.num_kv_heads * hp.head_dim
    largest = max(f * h, HD * h)
    return (2 * hp.num_layers * n_ctx * KVD * 4 + batch * hp.vocab_size * 8 + tokens * hp.vocab_size * 8
            + 8 * batch * (2 * f + 4 * h) * 4 + 2 * 4 * largest)


def weight_copy_bytes(hp: HParams, min_bits_per_weight: float, copy_max_bytes: int) -> int:
    """Upper side of a runtime's private copy of the weights (llama.cpp's repack, onnxruntime's
    prepack) made only for files of at most ``copy_max_bytes``: none when even the format's
    smallest file (``min_bits_per_weight``) is larger, else up to 8-bit weights (8.5 bits)."""
    from edgeq.ir import n_weight_params

    n = n_weight_params(hp)
    return 0 if n * min_bits_per_weight / 8 > copy_max_bytes else min(copy_max_bytes, int(n * 8.5 / 8))


PRUNE_QK_NORM = ("Q/K RoPE pairs are exempt (QK-norm normalises over the whole head dim: a kept prefix of "
                 "pairs would be normalised differently than in the full model); MLP channels only")


def switchable_prune_section(ir: ModelIR, opts: BuildOptions, expressed: str, bias: str | None = None,
                             **extra) -> dict:
    """The manifest's ``prune`` section of a format that carries every rate at full fidelity.
    ``bias``: how the format carries bias compensation (``--prune-bias``), added to ``expressed``
    when the model has it."""
    out = {"rates": list(ir.prune.rates), "method": opts.sort, "granularity": ir.prune.granularity,
           "widths": ir.prune.to_json()["widths"], "expressed": expressed, "dropped": "nothing", **extra}
    if ir.prune.dims != "all":
        out["dims"] = ir.prune.dims
    if ir.prune_means:
        out["bias"] = bias or "per-rate bias compensation"
        out["expressed"] = f"{expressed}; {out['bias']}"
    return out

"""GGUF at a pruning rate: one llama.cpp model file per supported rate.

llama.cpp fixes every tensor shape when it loads a model, so a GGUF artifact cannot switch
its pruning rate at run time: it carries one model file per rate (``model-r0.gguf``,
``model-r0.15.gguf`` ...) and the runtime loads the requested one.

Public API
----------
* :func:`gguf_prune_spec` — the part of ``ir.prune`` a GGUF file can express (per-layer MLP
  widths only; see its docstring for the two modes).
* :func:`write_gguf_at_rate` — one model GGUF at one rate (deterministic, atomic).
* :func:`write_gguf_rates` — every rate of ``ir.prune`` into a directory.
* :func:`reference_ir_for_gguf` / :func:`reference_ir_for_gguf_rate` — the ModelIR (with the
  GGUF-expressible PruneSpec) on which the numpy reference runtime computes exactly what the
  GGUF at a rate computes.
* :func:`prunable_params_removed`, :func:`rate_filename`.

llama.cpp facts this relies on (llama.cpp as vendored by llama-cpp-python 0.3.36; read in
ggml-org/llama.cpp ``src/llama-model.cpp`` / ``src/models/deci.cpp`` /
``convert_hf_to_gguf.py`` ``DeciModel``, and checked by tests/backends/gguf/test_rates.py):

* ``{arch}.feed_forward_length``, ``{arch}.attention.head_count`` and
  ``{arch}.attention.head_count_kv`` are read for *every* architecture with
  ``get_key_or_arr``: a scalar, or an array of ``block_count`` entries. Only the ``deci``
  architecture builds its tensors and graph from the per-layer values (``hparams.n_ff(il)``,
  ``n_head(il)``, ``n_head_kv(il)``); ``llama``/``qwen2`` create every layer's tensors with
  one width, so a file with per-layer MLP widths must say ``general.architecture = "deci"``.
* ``deci`` special cases: ``n_head == 0`` is an attention-free layer, ``n_head > 0`` with
  ``n_head_kv == 0`` a "linear attention" layer (only ``attn_output``, n_embd x n_embd),
  ``n_ff == 0`` an FFN-free layer (the graph ``continue``s, which also skips the residual
  update of that layer's attention output — only meaningful for Nemotron's all-dummy layers).
  We never write any of these: every width is at least one granularity step.
* One head dimension for the whole model (``attention.key_length`` / ``value_length`` are
  scalars; the ``deci`` graph asserts ``n_embd_head_k == n_embd_head_v == n_rot``), and RoPE
  uses the sequential frequencies ``theta_i = base^(-2i/n_rot)`` of each pair slot (the only
  per-pair hook, ``rope_freqs.weight``, is one tensor shared by every layer and head). Hence
  neither Q/K pair pruning inside a head nor V/O component truncation is expressible, and a
  sorted pair order must be undone before writing (``edgeq.passes.sort_qk.restore_rope_order``).
* ``deci`` uses rope type NORM (adjacent pairs) like ``llama``, so Q/K rows (and biases) get
  the same per-head rotate-half -> interleaved permutation as the ``llama`` arch — for Qwen2
  models too (Qwen2 itself is NEOX in llama.cpp; the permutation makes NORM equivalent).
* ``deci`` loads optional ``attn_q/k/v/output.bias`` (``attn_q.bias`` with ``n_embd``
  entries, so it needs ``num_heads * head_dim == hidden_size``, as llama.cpp's ``qwen2`` does)
  and optional FFN biases, and an optional ``output.weight`` (tied embeddings otherwise):
  Qwen2 at a rate is exact through ``deci``.
* Families with blocks beyond the Llama forward have no per-rate GGUF unless every layer keeps the
  same width and no bias is added: ``deci`` computes only the Llama forward, and llama.cpp's
  ``gemma3`` creates every layer's MLP at layer 0's width and loads no ``ffn_down`` bias (the
  family table's ``gguf_rates_refusal``; file and line in ``edgeq/families/gemma3.py``).
* ``llama`` and ``deci`` both create optional ``attn_output.bias`` and ``ffn_down.bias``
  (``{n_embd}``, ``TENSOR_NOT_REQUIRED``) and add them after the projection (``build_attn`` /
  ``build_ffn``): bias compensation (``--prune-bias``) is written as these biases, one rate per
  file (:func:`with_rate_bias`; checked against llama.cpp by tests/backends/gguf/test_rates.py).
"""
from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import numpy as np

from edgeq.artifact import atomic_write_file
from edgeq.errors import EdgeqError, require
from edgeq.ir import HParams, LayerWidths, Linear, ModelIR, PruneSpec, Role, full_widths, linear_name
from edgeq.backends.gguf.check import check
from edgeq.backends.gguf.layout import GGUF_ARCH, heads_for, rotate_half_to_interleaved, tensor_shapes
from edgeq.backends.gguf.types import base_type_of_plan, tensor_types
from edgeq.backends.gguf.write import write_model_header, write_tensors
from edgeq.families import RopeStyle, family
from edgeq.passes.prune_bias import rate_bias
from edgeq.passes.rate_plan import prunable_params
from edgeq.passes.sort_qk import restore_rope_order
from edgeq.quant.formats import FORMATS, QType, as_qtype

__all__ = [
    "DECI_ARCH",
    "GGUFRateMode",
    "RATE_KV",
    "gguf_prune_spec",
    "prunable_params_removed",
    "rate_filename",
    "reference_ir_for_gguf",
    "reference_ir_for_gguf_rate",
    "write_gguf_at_rate",
    "with_rate_bias",
    "write_gguf_rates",
]

DECI_ARCH = "deci"
RATE_KV = "edgeq.prune_rate"  # float32 metadata key: the pruning rate the file realises

TypesForRate = Union[Mapping[str, Any], Callable[[float], Mapping[str, Any]], int, str, QType]


class GGUFRateMode(str, Enum):
    """How a full pruning plan (MLP + Q/K pairs + V/O components) becomes a GGUF-expressible
    MLP-only plan."""

    MLP_ONLY_SAME_PARAMS = "mlp-only-same-params"  # remove the same parameter count, from the MLP
    DROP_ATTENTION = "drop-attention"  # keep the plan's MLP widths, drop its attention pruning


# --------------------------------------------------------------------------------------------
# the plan a GGUF can realise
# --------------------------------------------------------------------------------------------

def _layer_removed(hp: HParams, w: LayerWidths) -> int:
    return prunable_params(hp, full_widths(hp)) - prunable_params(hp, w)


def prunable_params_removed(hp: HParams, widths: tuple[LayerWidths, ...] | list[LayerWidths]) -> int:
    """Parameters a rate removes from the prunable linears, summed over layers: per layer
    Q/K rows ``2*qk_pairs*(H+KV)*hidden``, V rows + O columns ``v_dims*(KV+H)*hidden`` and MLP
    ``3*ffn*hidden`` (biases not counted), full minus kept."""
    return int(sum(_layer_removed(hp, w) for w in widths))


def _round_to_granularity(kept: np.ndarray, g: int, F: int) -> np.ndarray:
    """Continuous per-layer widths in [g, F] -> widths that are multiples of ``g`` (or F),
    each >= g, with the sum as close to ``kept.sum()`` as the step allows (largest remainder;
    ties go to the earlier layer, so the result is deterministic)."""
    full = kept >= F - 1e-9
    out = np.where(full, F, np.maximum(g, np.floor(kept / g + 1e-9).astype(np.int64) * g)).astype(np.int64)
    units = int(np.floor((kept.sum() - out.sum()) / g + 0.5 + 1e-9))  # a tie keeps the extra step
    if units > 0:
        rem = np.where(out >= F, -np.inf, kept - out)
        for i in np.argsort(-rem, kind="stable")[:units]:
            if np.isfinite(rem[i]):
                out[i] = min(out[i] + g, F)
    return out


def _mlp_only_widths(hp: HParams, ws: tuple[LayerWidths, ...], g: int) -> list[int]:
    F, h = hp.intermediate_size, hp.hidden_size
    lo = min(g, F)
    desired = np.array([F - _layer_removed(hp, w) / (3.0 * h) for w in ws], dtype=np.float64)
    target = desired.sum()
    kept = np.clip(desired, lo, F)
    excess = kept.sum() - target  # > 0: the floor at one step kept too much; < 0: the cap at F
    if abs(excess) > 1e-9:
        room = (kept - lo) if excess > 0 else (F - kept)
        if room.sum() > 0:
            kept = kept - np.sign(excess) * min(abs(excess), room.sum()) * room / room.sum()
    return [int(x) for x in _round_to_granularity(kept, g, F)]


def one_width_per_rate(arch) -> bool:
    """The family's llama.cpp architecture has one ``n_ff`` for every layer and no per-layer-width
    counterpart (its ``gguf_rates_refusal``): its rate files keep one MLP width in every layer."""
    return family(arch).gguf_rates_refusal is not None


def _one_width(ffn: list[int], g: int, F: int) -> int:
    """One MLP width for every layer carrying the same total channels as ``ffn`` (per-layer
    widths): the mean, rounded to the nearest multiple of ``g`` (half a step up), within [g, F]."""
    steps = int(np.floor(sum(ffn) / len(ffn) / g + 0.5))
    return int(min(F, max(min(g, F), steps * g)))


def _mode(mode: GGUFRateMode | str) -> GGUFRateMode:
    try:
        return GGUFRateMode(mode)
    except ValueError:
        raise EdgeqError(f"GGUF at a rate: expected mode in {[m.value for m in GGUFRateMode]}, "
                         f"got {mode!r}") from None


def gguf_prune_spec(ir: ModelIR, mode: GGUFRateMode | str = GGUFRateMode.MLP_ONLY_SAME_PARAMS) -> PruneSpec:
    """The pruning plan a GGUF file can realise: same rates, per-layer MLP widths only.

    GGUF (llama.cpp ``deci``) expresses per-layer MLP widths but neither Q/K pair pruning inside
    a head nor V/O component truncation (one head dim, sequential RoPE frequencies), so every
    layer keeps ``qk_pairs = head_dim/2`` and ``v_dims = head_dim``; the MLP width comes from
    ``mode``:

    * ``"mlp-only-same-params"`` (default): per layer, the MLP gives up as many parameters as
      the full plan removes from that layer at that rate (attention pruning turned into MLP
      channels: ``ffn = F - removed / (3*hidden)``, see :func:`prunable_params_removed`), so the
      plan's per-layer allocation and its global rate (= prunable parameters removed) are kept.
      A layer whose share would leave less than one granularity step keeps one step, and the
      overflow goes to the other layers in proportion to what they still have; widths are then
      rounded to multiples of ``spec.granularity`` (largest remainder: unless a bound binds, the
      total stays within half a step of the target; a tie keeps the extra step) and made
      monotone in the rate. A plan that prunes only the MLP comes back unchanged.
    * ``"drop-attention"``: keep the plan's MLP widths and ignore its attention pruning (the
      file is larger than the plan says, but its MLP is exactly the plan's).

    A family whose llama.cpp architecture has one ``n_ff`` for every layer and no per-layer-width
    counterpart (its ``gguf_rates_refusal``: Gemma 3) gets one width per rate: every layer keeps
    the mean of the widths above, rounded to the nearest multiple of the granularity
    (:func:`_one_width`), so each rate's file is the family's own architecture with a smaller
    ``feed_forward_length``; the per-layer allocation is dropped (the manifest says so).

    Rate 0 keeps everything. An IR without a PruneSpec gives the one-rate spec ``(0,)``.
    """
    mode = _mode(mode)
    hp = ir.hparams
    full = full_widths(hp)
    spec = ir.prune
    one_width = one_width_per_rate(hp.arch)
    if spec is None:
        return PruneSpec(rates=(0.0,), widths={0.0: tuple(full for _ in range(hp.num_layers))}, granularity=1)
    widths: dict[float, tuple[LayerWidths, ...]] = {}
    prev: list[int] | None = None
    for r in spec.rates:
        ws = spec.widths[r]
        if r == 0.0:
            ffn = [hp.intermediate_size] * hp.num_layers
        elif mode == GGUFRateMode.DROP_ATTENTION:
            ffn = [w.ffn for w in ws]
        else:
            ffn = _mlp_only_widths(hp, ws, max(1, int(spec.granularity)))
        if one_width and r != 0.0:
            ffn = [_one_width(ffn, max(1, int(spec.granularity)), hp.intermediate_size)] * hp.num_layers
        if prev is not None:
            ffn = [min(a, b) for a, b in zip(ffn, prev)]
        prev = ffn
        widths[r] = tuple(dataclasses.replace(full, ffn=int(f)) for f in ffn)
    return PruneSpec(rates=tuple(spec.rates), widths=widths, granularity=spec.granularity,
                     importance=spec.importance)


# --------------------------------------------------------------------------------------------
# exact rewrites of the IR
# --------------------------------------------------------------------------------------------

def reference_ir_for_gguf(ir: ModelIR, mode: GGUFRateMode | str = GGUFRateMode.MLP_ONLY_SAME_PARAMS) -> ModelIR:
    """``ir`` with the RoPE-pair order restored and ``prune = gguf_prune_spec(ir, mode)``: run
    the reference runtime on it with ``set_prune_rate(r)`` and it computes exactly what
    ``write_gguf_at_rate(ir, r, ...)`` holds (up to the weight format)."""
    spec = gguf_prune_spec(ir, mode)
    return restore_rope_order(ir).replace(prune=spec)


def reference_ir_for_gguf_rate(ir: ModelIR, rate: float,
                               mode: GGUFRateMode | str = GGUFRateMode.MLP_ONLY_SAME_PARAMS) -> ModelIR:
    """Like :func:`reference_ir_for_gguf`, with a PruneSpec that carries only ``(0, rate)``
    (``rate`` must be one of ``ir.prune``'s); use ``ReferenceSession(..).set_prune_rate(rate)``."""
    spec = gguf_prune_spec(ir, mode)
    ws = spec.at(rate)  # raises for a rate the model does not carry
    r = next(x for x in spec.rates if abs(x - rate) < 1e-9)
    rates = (0.0,) if r == 0.0 else (0.0, r)
    one = PruneSpec(rates=rates, widths={0.0: spec.widths[0.0], r: ws}, granularity=spec.granularity,
                    importance=spec.importance)
    return restore_rope_order(ir).replace(prune=one)


def with_rate_bias(ir: ModelIR, widths: tuple[LayerWidths, ...]) -> ModelIR:
    """``ir`` at one rate's ``widths`` with its bias compensation (``ir.prune_means``,
    ``edgeq.passes.prune_bias``) folded into the biases of ffn_down / attn_output, which llama.cpp's
    ``llama`` and ``deci`` architectures load as optional ``ffn_down.bias`` / ``attn_output.bias``
    (``{n_embd}``, added after the projection): a one-rate file carries its rate's vectors as plain
    biases. Biases are only added where the vector is non-zero (GGUF widths keep every V/O component,
    so attn_output gets none); the result carries no means. Without means: ``ir`` unchanged."""
    if not ir.prune_means:
        return ir
    linears = dict(ir.linears)
    for li, w in enumerate(widths):
        for role, b in zip((Role.O, Role.DOWN), rate_bias(ir, li, w)):
            if b.any():
                lin = linears[linear_name(li, role)]
                old = np.zeros(lin.out_features, np.float32) if lin.bias is None else lin.bias
                linears[lin.name] = dataclasses.replace(lin, bias=(old + b).astype(np.float32))
    return ir.replace(linears=linears, prune_means={})


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def rate_filename(rate: float) -> str:
    """``model-r{rate:g}.gguf``: ``model-r0.gguf``, ``model-r0.15.gguf``."""
    return f"model-r{float(rate):g}.gguf"


def _resolve_types(ir: ModelIR, types: TypesForRate, rate: float) -> dict[str, QType]:
    if callable(types) and not isinstance(types, (str, QType)):
        types = types(rate)
    if isinstance(types, (int, str, QType)) and not isinstance(types, bool):
        return tensor_types(ir, types)
    if not isinstance(types, Mapping):
        raise EdgeqError(f"GGUF at a rate: expected a type plan (mapping), bits or a type, got {type(types).__name__}")
    return {k: as_qtype(v) for k, v in types.items()}


def _choose_arch(ir: ModelIR, ffn: list[int], arch: str) -> str:
    if arch not in ("auto", DECI_ARCH):
        raise EdgeqError(f"GGUF at a rate: expected arch 'auto' or 'deci', got {arch!r}")
    o_bias = any(lin.role == Role.O and lin.bias is not None for lin in ir.linears.values())
    if arch == "auto" and len(set(ffn)) == 1 and not (o_bias and not family(ir.arch).gguf_loads_o_bias):
        return GGUF_ARCH[ir.arch]  # one width for every layer: the model's own architecture
    # deci also takes an attn_output bias (llama.cpp's qwen2 does not load one; the SVD V/O
    # pass folds Qwen2's V bias into it)
    return DECI_ARCH


def write_gguf_at_rate(ir: ModelIR, rate: float, path: str | Path, types: TypesForRate, *,
                       mode: GGUFRateMode | str = GGUFRateMode.MLP_ONLY_SAME_PARAMS, arch: str = "auto",
                       extra_kv: Mapping[str, Any] | None = None, progress: bool = False) -> Path:
    """Write the model at pruning ``rate`` as a GGUF that stock llama.cpp loads; returns ``path``.

    1. If ``ir`` has a ``rope_index``, the Q/K rows go back to the original pair order
       (``edgeq.passes.sort_qk.restore_rope_order``, exact), so llama.cpp's sequential RoPE frequencies apply.
    2. Each layer's MLP is cut to the width of ``gguf_prune_spec(ir, mode).at(rate)``: the
       first rows of ``ffn_gate``/``ffn_up`` (and their biases), the first columns of
       ``ffn_down`` (the IR's MLP channels are sorted by importance). Attention is written whole.
    3. ``general.architecture``: with ``arch="auto"`` the model's own (``llama``/``qwen2``,
       exactly what :func:`edgeq.backends.gguf.lower.write_gguf` writes) when every layer has the same
       width (rate 0 in particular), else ``deci`` with a per-layer ``deci.feed_forward_length``
       array (head counts stay scalars: whole heads are never pruned); ``arch="deci"`` always
       writes ``deci``. Q/K rows and biases are permuted to llama.cpp's interleaved RoPE pairs
       for ``llama`` and ``deci`` (not for ``qwen2``, which is NEOX in llama.cpp).

    ``types``: a plan from :func:`edgeq.backends.gguf.lower.tensor_types` on ``ir`` (IR names, full
    shapes), bits / a type name (then ``tensor_types(ir, types)``), or a callable
    ``rate -> plan``. Every cut ``ffn_down`` row length must be a multiple of its type's block
    size. The file also records ``edgeq.prune_rate`` (float32). Deterministic and atomic, like
    ``write_gguf``. Low-rank branches are refused (merge them first).
    """
    gguf = require("gguf", "gguf")
    rate = float(rate)
    spec = gguf_prune_spec(ir, mode)
    widths = spec.at(rate)
    r_key = next(x for x in spec.rates if abs(x - rate) < 1e-9)
    tplan = _resolve_types(ir, types, r_key)
    name = Path(path).name
    base_ir = with_rate_bias(restore_rope_order(ir), widths)
    # a Qwen2 attn_output bias routes the file to 'deci' (_choose_arch), which loads it
    problems = check(base_ir, tplan, as_deci=True)
    if problems:
        raise EdgeqError(f"GGUF at rate {r_key:g}: cannot write {name}: {problems[0]}"
                         + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    hp = base_ir.hparams
    ffn = [int(w.ffn) for w in widths]
    arch_s = _choose_arch(base_ir, ffn, arch)
    deci = arch_s == DECI_ARCH
    why = family(hp.arch).gguf_rates_refusal  # no per-layer-width architecture computes its blocks
    if why and (deci or any(l.bias is not None for l in base_ir.linears.values() if l.role == Role.DOWN)):
        raise EdgeqError(f"GGUF at rate {r_key:g}: cannot write {name}: {why}")
    if deci and hp.num_heads * hp.head_dim != hp.hidden_size and any(
            l.bias is not None for l in base_ir.linears.values() if l.role in (Role.Q, Role.O)):
        raise EdgeqError(f"GGUF at rate {r_key:g}: llama.cpp's deci architecture needs "
                         f"num_heads*head_dim == hidden_size for attn_q/attn_output biases, got "
                         f"{hp.num_heads}*{hp.head_dim} != {hp.hidden_size}")
    # deci is rope type NORM (interleaved pairs), like llama
    permute_qk = family(hp.arch).gguf_permute_qk if arch_s == GGUF_ARCH[hp.arch] else \
        family(hp.arch).hf_rope != RopeStyle.INTERLEAVED

    def layer_tensor(lin: Linear, bias: bool) -> np.ndarray:
        a = lin.bias if bias else lin.weight
        f = ffn[lin.layer]
        if lin.role in (Role.GATE, Role.UP):
            a = a[:f]
        elif lin.role == Role.DOWN and not bias:
            a = a[:, :f]
        elif permute_qk and lin.role in (Role.Q, Role.K):
            a = rotate_half_to_interleaved(a, heads_for(hp, lin.role))
        return a

    order: list[tuple[str, tuple[int, ...]]] = []
    for tname, shape in tensor_shapes(base_ir).items():  # the full model's, cut to the layer's MLP width
        lname = tname[: -len(".bias")] if tname.endswith(".bias") else tname
        lin = base_ir.linears.get(lname)
        if lin is not None and lin.role in (Role.GATE, Role.UP):
            shape = (ffn[lin.layer], *shape[1:])
        elif lin is not None and lin.role == Role.DOWN and lname == tname:
            shape = (shape[0], ffn[lin.layer])
        order.append((tname, shape))
    for tname, shape in order:
        qt = tplan.get(tname, QType.F32)
        bs = FORMATS[qt].block_size
        if len(shape) == 2 and shape[1] % bs:
            raise EdgeqError(f"GGUF at rate {r_key:g}: {tname}: {qt.value} needs a row length that is a "
                             f"multiple of {bs}, got {shape[1]} (choose widths on a {bs}-step grid)")
    if RATE_KV in (extra_kv or {}):
        raise EdgeqError(f"GGUF: extra_kv may not override {RATE_KV!r}")
    kv_extra = {RATE_KV: float(r_key), **dict(extra_kv or {})}
    base_type = base_type_of_plan(base_ir, tplan)

    def array_of(tname: str) -> np.ndarray:
        if tname.endswith(".bias"):
            return layer_tensor(base_ir.linears[tname[: -len(".bias")]], bias=True)
        if tname in base_ir.linears:
            return layer_tensor(base_ir.linears[tname], bias=False)
        return base_ir.tensors[tname]

    def fill(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch_s)
        try:
            write_model_header(w, base_ir, base_type, kv_extra, ffn=list(ffn) if deci else int(ffn[0]))
            write_tensors(w, dict(order), tplan, array_of, name, progress)
        finally:
            w.close()

    atomic_write_file(Path(path), fill)
    return Path(path)


def write_gguf_rates(ir: ModelIR, out_dir: str | Path, types_for_rate: TypesForRate, *,
                     mode: GGUFRateMode | str = GGUFRateMode.MLP_ONLY_SAME_PARAMS, arch: str = "auto",
                     extra_kv: Mapping[str, Any] | None = None, progress: bool = False) -> dict[float, str]:
    """Write :func:`write_gguf_at_rate` for every rate of ``ir.prune`` (just 0 without one) into
    ``out_dir`` as :func:`rate_filename` files; returns ``{rate: filename}``.

    ``types_for_rate``: a callable ``rate -> type plan``, or one plan / bits / type for all."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = gguf_prune_spec(ir, mode)
    files: dict[float, str] = {}
    for r in spec.rates:
        fname = rate_filename(r)
        write_gguf_at_rate(ir, r, out_dir / fname, types_for_rate, mode=mode, arch=arch, extra_kv=extra_kv,
                           progress=progress)
        files[r] = fname
    return files

"""The reference check of an artifact: its next-token distributions vs the float reference's at
the golden positions, against the bounds of its weight format (``edgeq.tolerances``).

The format bounds were set on real and small random models. Some models lose more to a correct
rounding than those bounds allow: large random weights over many layers (a tiny 8-layer Llama of
std-0.3 weights loses 56 % of its reference's information to a Q4_0 file byte-identical to plain
rounding; a random-weight 8B, 65 %), because such a model amplifies rounding. So when a build's
check fails, the build measures what the *format itself* costs this model: the same reference
run with every block linear rounded to the artifact's weight type (round to nearest, the
format's own grid) — the goldens' ``reference_floor``. ``verify`` then accepts an artifact that
loses at most FLOOR_HEADROOM x that floor; and where even FLOOR_HEADROOM x the floor reaches the
loss of an artifact of another model (UNRELATED_MIN_RELATIVE_KL), it says the check is
inconclusive for this model, rather than passing or failing on numbers that mean nothing."""
from __future__ import annotations

import dataclasses

import numpy as np

from edgeq import goldens, tolerances
from edgeq.quant import intgroup, storage
from edgeq.quant import reference as ggml_reference


def problems(ref: goldens.Comparison, tol: tolerances.ReferenceTolerance, at: str, fmt: str) -> list[str]:
    """The artifact vs the fp32 reference: absolute KL, relative KL, top-1 where the reference is clear."""
    out = []
    if ref.mean_kl > tol.max_mean_kl:
        out.append(f"{at}mean KL {ref.mean_kl:.4g} > {tol.max_mean_kl} {fmt}")
    if ref.relative_kl > tol.max_relative_kl:
        out.append(f"{at}relative KL {ref.relative_kl:.4g} > {tol.max_relative_kl} {fmt} (mean KL "
                   f"{ref.mean_kl:.4g} of the reference's {ref.mean_info:.4g} nats from uniform)")
    if ref.clear_positions >= tolerances.TOP1_MIN_CLEAR_POSITIONS and ref.clear_top1_agreement < tol.min_top1:
        out.append(f"{at}top-1 agreement {ref.clear_top1_agreement:.4f} < {tol.min_top1} {fmt} at the "
                   f"{ref.clear_positions} positions where the reference's top-1 leads by >= "
                   f"{tolerances.TOP1_CLEAR_MARGIN} nats")
    return out


def floor_problems(ref: goldens.Comparison, floor: dict, at: str) -> list[str]:
    """The artifact vs the loss plain rounding to its format has on this model (``floor``)."""
    h, out = tolerances.FLOOR_HEADROOM, []
    what = f"{h} x what rounding to {floor['weight_type']} alone loses on this model"
    if ref.relative_kl > h * floor["relative_kl"]:
        out.append(f"{at}relative KL {ref.relative_kl:.4g} > {h * floor['relative_kl']:.4g} ({what}: "
                   f"{floor['relative_kl']:.4g})")
    f1 = floor.get("clear_top1_agreement")
    if (f1 is not None and ref.clear_positions >= tolerances.TOP1_MIN_CLEAR_POSITIONS
            and ref.clear_top1_agreement < f1 - tolerances.FLOOR_TOP1_SLACK):
        out.append(f"{at}top-1 agreement {ref.clear_top1_agreement:.4f} < {f1 - tolerances.FLOOR_TOP1_SLACK:.4f} at "
                   f"clear positions (rounding to {floor['weight_type']} alone: {f1:.4f})")
    return out


def inconclusive(floor: dict | None, at: str) -> str | None:
    """A note saying why the reference check cannot judge this model, or None when it can."""
    if not floor or tolerances.FLOOR_HEADROOM * floor["relative_kl"] < tolerances.UNRELATED_MIN_RELATIVE_KL:
        return None
    return (f"{at}reference check inconclusive for this model: rounding its block linears to "
            f"{floor['weight_type']} alone loses relative KL {floor['relative_kl']:.4g} in the reference runtime, so "
            f"the bound ({tolerances.FLOOR_HEADROOM} x that) reaches the loss of an artifact of another model "
            f"(>= {tolerances.UNRELATED_MIN_RELATIVE_KL}): its outputs cannot tell a correct build from a wrong one "
            "(the regression check still applies)")


def check(ref: goldens.Comparison, tol: tolerances.ReferenceTolerance, floor: dict | None, at: str,
          fmt: str) -> tuple[list[str], str | None]:
    """(problems, note) of the reference check: the format's bounds, or — for a model whose
    floor was measured — the floor's; a note instead of problems where the check is inconclusive."""
    note = inconclusive(floor, at)
    if note:
        return [], note
    out = problems(ref, tol, f"{at}reference: ", fmt)
    if out and floor:
        out = floor_problems(ref, floor, f"{at}reference: ")
        if not out:  # passed, but on the model's floor, not the format's bound: say so
            return [], (f"{at}reference: judged against this model's rounding floor, not the {floor['weight_type']} "
                        f"bound (relative KL <= {tol.max_relative_kl:g}): relative KL {ref.relative_kl:.4g} is within "
                        f"{tolerances.FLOOR_HEADROOM} x what rounding to {floor['weight_type']} alone loses on this "
                        f"model ({floor['relative_kl']:.4g})")
    return out, None


def format_rounding(weight_type: str | None, target):
    """weight (out, in) -> the float32 values a runtime computes with once it is stored as
    ``weight_type`` by plain rounding, or None for a float type."""
    st = storage.find(weight_type)
    if st is None or not st.quantized:
        return None
    if st.is_ggml:
        return lambda w: ggml_reference.roundtrip(np.asarray(w, dtype=np.float32), st.name)
    name = st.codec_name(target.quant_block_size)
    return lambda w: intgroup.dequantized(np.asarray(w, dtype=np.float32), name)


class _Rounded:
    """A weight that materialises rounded (one tensor at a time, when a layer is loaded)."""

    def __init__(self, weight, rounding):
        self._w, self._f = weight, rounding
        self.shape, self.size, self.ndim = tuple(weight.shape), int(np.prod(weight.shape)), len(weight.shape)
        self.dtype = np.dtype(np.float32)

    def __array__(self, dtype=None, copy=None):
        a = self._f(self._w)
        return a if dtype is None else a.astype(dtype, copy=False)


def rounded_ir(ir, rounding):
    """``ir`` with every block linear's weight rounded by ``rounding`` on materialisation."""
    return ir.replace(linears={name: dataclasses.replace(lin, weight=_Rounded(lin.weight, rounding))
                               for name, lin in ir.linears.items()})


def floor_entry(cmp: goldens.Comparison, weight_type: str) -> dict:
    return {"weight_type": weight_type, "rounding": "round to nearest, every block linear",
            "relative_kl": round(float(cmp.relative_kl), 6), "mean_kl": round(float(cmp.mean_kl), 6),
            "clear_top1_agreement": None if cmp.clear_top1_agreement is None else round(float(cmp.clear_top1_agreement), 6)}

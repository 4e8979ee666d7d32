"""The rounding noise of the activations a runtime quantizes before a matmul, for the planner.

llama.cpp does not multiply a quantized weight by float activations: it first rounds the
activation row to the weight type's *dot type* and runs an integer (or half) dot product. On its
CPU backend the legacy types (Q4_0 ... Q8_0; Q4_1 / Q5_1 pair with Q8_1, which rounds the same)
take ``q8_0`` activations — int8 per block of 32 with an fp16 scale ``amax / 127`` — the K-quants
take ``q8_k`` — int8 per block of **256** with a float scale ``max / -127`` (one scale for 8x as
many values: coarser wherever a block holds an outlier channel) — and F16 weights take ``f16``
activations. Its CUDA backend's quantized kernels (MMQ / MMVQ) take ``q8_1`` (blocks of 32) for
every quantized type. F32 weights see float32 activations.

So two types with the same weight error can cost very different output error: measured on
Gemma 3 270M (docs/benchmarks.md, issue 17), replacing 27 Q4_K tensors whose weights were exact
(the checkpoint came from a Q4_K file) by Q8_0 halved the KL of the whole model — the Q4_K ones
paid for q8_k rounding of their inputs (attention output and GeGLU output: heavy outlier
channels). The planner therefore adds, to each option's weight error ``tr(E C Eᵀ)``, the output
error of its activation rounding ``E‖W δ‖² ≈ Σ_j ‖w_j‖² E[δ_j²]`` (rounding errors uncorrelated
across channels), with ``E[δ_j²]`` per input channel measured on the calibration activations
(:func:`noise_sums`, accumulated by :mod:`edgeq.calibrate`).

The rounding here follows ggml's reference quantizers (``quantize_row_q8_0_ref`` /
``quantize_row_q8_K_ref``); it is a noise model, so the last bit does not matter.
"""
from __future__ import annotations

import numpy as np

CODECS = ("q8_0", "q8_k", "f16")
BLOCK = {"q8_0": 32, "q8_k": 256, "f16": 1}
# the four inputs of a block's linears (calibration taps): attention input (Q/K/V), o_proj input,
# MLP input (gate/up), down_proj input
INPUTS = ("attn", "o", "ffn", "down")
MODELS = ("llama-cpu", "llama-cuda", "none")

_LEGACY = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
_KQUANT = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def dot_codec(qtype: str, model: str = "llama-cpu") -> str | None:
    """The activation rounding the runtime applies before a matmul with a ``qtype`` weight (None:
    float32 activations, or a model without activation rounding)."""
    if model == "none" or qtype == "F32":
        return None
    if qtype in ("F16", "BF16"):
        return "f16"
    if model == "llama-cuda":
        return "q8_0"
    if qtype in _KQUANT:
        return "q8_k"
    if qtype in _LEGACY:
        return "q8_0"
    return None  # other formats' types (int groups): not modelled here


def rounded(x: np.ndarray, codec: str) -> np.ndarray:
    """``x`` (T, n) float32 after the ``codec``'s round trip (``n`` a multiple of its block)."""
    x = np.asarray(x, dtype=np.float32)
    if codec == "f16":
        return x.astype(np.float16).astype(np.float32)
    B = BLOCK[codec]
    T, n = x.shape
    blocks = x.reshape(T, n // B, B)
    with np.errstate(divide="ignore", invalid="ignore"):
        if codec == "q8_0":
            d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
            inv = np.where(d > 0, np.float32(1) / d, np.float32(0))
            v = blocks * inv
            # roundf: ties away from zero
            q = np.where(np.abs(v - np.trunc(v)) == np.float32(0.5), np.trunc(v) + np.sign(v), np.round(v))
            out = q * d.astype(np.float16).astype(np.float32)
        else:  # q8_k: the element of largest magnitude, with its sign, maps to -127
            idx = np.abs(blocks).argmax(axis=-1)[..., None]
            mx = np.take_along_axis(blocks, idx, axis=-1)
            iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0))
            q = np.minimum(np.round(blocks * iscale), 127)  # ggml's nearest_int: ties to even
            d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0))
            out = q * d
    return out.reshape(T, n).astype(np.float32)


def noise_sums(x: np.ndarray) -> dict[str, np.ndarray]:
    """codec -> (n,) float64 sum over the rows of ``x`` (T, n) of the squared rounding error, for
    each codec whose block divides ``n`` (the others cannot serve this input)."""
    x = np.asarray(x, dtype=np.float32)
    out = {}
    for c in CODECS:
        if x.shape[1] % BLOCK[c]:
            continue
        d = (rounded(x, c) - x).astype(np.float64)
        out[c] = np.einsum("ij,ij->j", d, d)
    return out


def activation_error(w: np.ndarray, noise: np.ndarray | None) -> float:
    """Output error ``Σ_j ‖w_j‖² E[δ_j²]`` of a linear ``w`` (out x in) whose inputs carry rounding
    noise of per-channel mean square ``noise`` (in,); 0 without one."""
    return 0.0 if noise is None else weighted_noise(column_energy(w), noise)


def weighted_noise(col: np.ndarray, noise: np.ndarray | None) -> float:
    """:func:`activation_error` from the linear's :func:`column_energy` ``col`` (computed once per
    linear, reused for each codec's ``noise``); 0 without noise."""
    return 0.0 if noise is None else float(col @ np.asarray(noise, dtype=np.float64))


def column_energy(w: np.ndarray) -> np.ndarray:
    """(in,) float64 ``‖w_j‖²`` of each input column of ``w`` (out x in): what
    :func:`activation_error` weighs the noise by."""
    w = np.asarray(w, dtype=np.float32)
    return np.einsum("ij,ij->j", w, w, dtype=np.float64)

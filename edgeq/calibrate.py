"""Calibration statistics for the UniQL-style sorting passes (numpy only, streaming).

Data
----
:func:`alpaca_token_sequences` turns Alpaca records (instruction / input / output) into
token sequences of exactly ``seq_len`` tokens: records are shuffled with ``seed``, formatted,
tokenized, joined (each record ends with the EOS token) and the token stream is cut into
consecutive chunks. No chunk is ever padded, so no padding enters the statistics. Calibration
uses Alpaca only, never evaluation data.

Two text formats (``fmt``):

* ``"alpaca"`` (default): ``### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]###
  Response:\\n{output}`` -- plain text, architecture-neutral, no system prompt repeated in
  every record (the model's own chat template would spend a large share of the tokens on one
  repeated system prompt, e.g. SmolLM2's).
* ``"chat"``: the model's chat template (``runtimes.text.render_chat``) on the user turn,
  followed by the response and EOS: closest to how an instruct model is prompted at run time.

Statistics
----------
:func:`calibrate` runs each sequence through the model in fp32 (rate 0, low-rank branches
applied), so every layer sees the outputs of the previous *uncompressed* layers. The forward is
the reference runtime's own (``LayerWeights``, ``layer_forward``), family blocks included (Gemma 3:
scaled embeddings, QK-norm, sandwich norms, GeGLU, sliding windows); the accumulators read its
``taps`` (the input of every linear, Q/K before RoPE and before a QK-norm). With Gemma's sandwich
norms the taps are still the linears' inputs: q/k/v after the input norm, o_proj's the attention
output, gate/up after the pre-FFN norm (``ffn_norm``), down_proj's ``gelu(gate) * up``; the
post-norms act on the projections' outputs, after them. One sequence is processed at a time and
only these float64 accumulators are kept (memory is independent of the number of samples:
``num_layers * (d_ff**2 + 2 * hidden**2 + (heads * head_dim)**2) * 8`` bytes, 725 MB for
SmolLM2-135M, spilled a layer at a time inside ``edgeq.spill.spilling``):

* ``mlp_zz``: mean over tokens of ``Z^T Z``, ``Z = act(gate(x)) * up(x)`` (d_ff x d_ff; act: SiLU, Gemma's tanh-GELU);
* ``attn_xx``: mean over tokens of ``X^T X``, X the attention input (after attn_norm): the
  input covariance of q/k/v_proj;
* ``o_xx``: mean ``O^T O`` of the o_proj input (attention output, IR column order head-major);
* ``ffn_xx``: mean ``X^T X`` of the MLP input (after ffn_norm): the input of gate/up_proj.
  With ``mlp_zz`` (the down_proj input) every linear has its input covariance: the Hessian of
  GPTQ and the weighting of the activation-aware error compensation (QERA).
* ``q_diag`` / ``k_diag``: mean of ``q_j**2`` per query head / ``k_j**2`` per KV head and
  head dim j, both taken **pre-RoPE** (the q_proj / k_proj outputs, biases and low-rank
  branches included), in the IR's current row layout. Both are pre-RoPE, so the Q/K score
  compares like with like (UniQL mixes pre- and post-RoPE). Pre-RoPE statistics do not depend
  on positions or on ``rope_index``; the per-pair energy ``q_j**2 + q_{j+d/2}**2`` is the same
  pre- and post-RoPE (a rotation of each pair), only its split between the two halves differs.
* ``angular``: mean over sequences of ``1 - cos(x_in, x_out)`` of the layer's input and output
  residual stream at the last token (UniQL's layer importance).
* ``z_mean`` / ``o_mean``: the mean over tokens of down_proj's input Z (d_ff,) and of o_proj's
  input (heads * head_dim, IR column order): the mean inputs of the two input-pruned linears,
  which bias compensation puts back for the inputs a rate drops (``edgeq.rate_bias``).
* ``act_noise``: per linear input (``attn``, ``o``, ``ffn``, ``down``) and activation codec of
  :mod:`edgeq.quant.act_noise` (``q8_0``, ``q8_k``, ``f16``: how llama.cpp rounds a matmul's input
  for the weight type), the mean squared rounding error per input channel — what the planner adds
  to each option's error. (o_proj's input is rounded in the runtime's column order, then put in
  the IR's: llama.cpp's 32-blocks of that input may group the channels differently when V/O were
  sorted; a noise model, not an exact one.)

:func:`collect_means` gathers only ``z_mean`` / ``o_mean`` (no Gram matrices: the cost of the
forward alone) on a model as it is now, e.g. after the sorts changed the column order of the
statistics :func:`calibrate` collected before them.

Shards
------
The samples are cut into fixed *shards* of :data:`SHARD_SAMPLES` consecutive samples
(:func:`shard_bounds`: the boundaries depend on the number of samples only). Per layer, each
shard's sums start from zero and run over its samples in order (:func:`run_shard`); the layer's
sums are the shards' sums added in shard order (the first shard's taken as they are). Every
value is therefore the same bits however many shards run at a time and wherever they run: on
worker threads of this process (:func:`thread_shards`, ``EDGEQ_THREADS``; numpy releases the GIL
in BLAS and its loops, the Gram updates call BLAS through ``edgeq.blas.syrk_lower``, which does
too, and each thread's BLAS runs on one thread, ``edgeq.blas``), or as tasks of
the build's executor (``edgeq.pipeline.split``: worker processes, Ray). One worker is the same
shards one after another. Memory: a layer's running sum plus one partial sum per shard in
flight (``workers + 1`` sets of float64 accumulators; one set with a single shard), the partials
added as they arrive, in order (``edgeq.memory.calibration_bytes``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

import edgeq
from edgeq.blas import one_blas_thread, syrk_lower
from edgeq.errors import EdgeqError
from edgeq.ir import LayerMeans, ModelIR, Role, TokenizerSpec, full_widths
from edgeq.quant import act_noise
from edgeq.spill import spill_array
from edgeq.streaming import ordered_map, worker_threads
from runtimes.reference import LayerWeights, layer_forward, pruning_layout, rope_inv_freq
from runtimes.text import SpecTokenizer, render_chat

# the reference forward's taps -> the linear inputs of edgeq.quant.act_noise; a linear's role -> its input
TAP_INPUT = {"attn_in": "attn", "o_in": "o", "ffn_in": "ffn", "down_in": "down"}
ROLE_INPUT = {Role.Q: "attn", Role.K: "attn", Role.V: "attn", Role.O: "o", Role.GATE: "ffn", Role.UP: "ffn",
              Role.DOWN: "down"}

ALPACA_FILE = Path("alpaca") / "alpaca_small.json"
FORMATS = ("alpaca", "chat")


def default_data_dir() -> Path:
    """``$EDGEQ_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("EDGEQ_DATA")
    if env:
        return Path(env)
    return Path(edgeq.__file__).resolve().parents[2] / "shared" / "data"


def load_alpaca(path: str | Path | None = None) -> list[dict]:
    path = Path(path) if path is not None else default_data_dir() / ALPACA_FILE
    if not path.is_file():
        raise EdgeqError(f"Alpaca calibration data not found at {path} "
                         "(set EDGEQ_DATA to the directory holding alpaca/alpaca_small.json)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "instruction" in r and "output" in r
                                                for r in records):
        raise EdgeqError(f"{path}: expected a JSON list of {{instruction, input, output}} records")
    return records


def format_record(rec: Mapping, fmt: str = "alpaca", spec: TokenizerSpec | None = None) -> str:
    instruction, inp, out = rec["instruction"].strip(), str(rec.get("input") or "").strip(), rec["output"].strip()
    if fmt == "alpaca":
        parts = [f"### Instruction:\n{instruction}\n\n"]
        if inp:
            parts.append(f"### Input:\n{inp}\n\n")
        parts.append(f"### Response:\n{out}")
        return "".join(parts)
    if fmt == "chat":
        if spec is None:
            raise EdgeqError("the chat format needs the model's tokenizer spec")
        return render_chat(spec, f"{instruction}\n\n{inp}" if inp else instruction) + out
    raise EdgeqError(f"unknown calibration text format {fmt!r} (expected one of {', '.join(FORMATS)})")


def alpaca_token_sequences(tokenizer_spec: TokenizerSpec, path: str | Path | None = None, n_samples: int = 128,
                           seq_len: int = 256, seed: int = 0, fmt: str = "alpaca") -> list[list[int]]:
    """``n_samples`` token sequences of exactly ``seq_len`` tokens from Alpaca (see module doc).

    Deterministic given ``seed`` (record order is ``default_rng(seed).permutation``)."""
    if n_samples < 1 or seq_len < 2:
        raise EdgeqError(f"expected n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    if fmt not in FORMATS:
        raise EdgeqError(f"unknown calibration text format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if tokenizer_spec is None:
        raise EdgeqError("the model has no tokenizer; cannot tokenize calibration text")
    records = load_alpaca(path)
    tok = SpecTokenizer(tokenizer_spec)
    eos = [tokenizer_spec.eos_id] if tokenizer_spec.eos_id is not None else []
    need = n_samples * seq_len
    stream: list[int] = []
    for i in np.random.default_rng(seed).permutation(len(records)):
        ids = tok.encode(format_record(records[int(i)], fmt, tokenizer_spec), add_special=True)
        if len(ids) > 1 and ids[0] == ids[1] == tokenizer_spec.bos_id:  # a chat template that writes BOS (Gemma)
            ids = ids[1:]
        stream.extend(ids + eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise EdgeqError(f"the Alpaca data holds {len(stream)} tokens, fewer than {n_samples} x {seq_len} = {need}; "
                         "ask for fewer or shorter sequences")
    return [stream[k * seq_len:(k + 1) * seq_len] for k in range(n_samples)]


# ---- statistics ------------------------------------------------------------------------------

_LAYER_FIELDS = ("mlp_zz", "attn_xx", "q_diag", "k_diag", "o_xx", "ffn_xx", "z_mean", "o_mean")
_REQUIRED = _LAYER_FIELDS[:4]  # o_xx / ffn_xx / z_mean / o_mean are absent from files of older versions


@dataclass
class LayerStats:
    mlp_zz: np.ndarray  # (d_ff, d_ff) float64, mean Z^T Z
    attn_xx: np.ndarray  # (hidden, hidden) float64, mean X^T X of the attention input
    q_diag: np.ndarray  # (num_heads, head_dim) float64, mean q_j^2 (pre-RoPE)
    k_diag: np.ndarray  # (num_kv_heads, head_dim) float64, mean k_j^2 (pre-RoPE)
    angular: float  # mean over sequences of 1 - cos(x_in, x_out) at the last token
    n_tokens: int
    o_xx: np.ndarray | None = None  # (heads*head_dim,)*2 float64, mean O^T O of the o_proj input
    ffn_xx: np.ndarray | None = None  # (hidden, hidden) float64, mean X^T X of the MLP input
    z_mean: np.ndarray | None = None  # (d_ff,) float64, mean of the down_proj input Z
    o_mean: np.ndarray | None = None  # (heads*head_dim,) float64, mean of the o_proj input (IR order)
    # "{input}.{codec}" -> (width,) float64, per channel the mean squared rounding error of that linear input
    # under a runtime's activation rounding (edgeq.quant.act_noise; codecs whose block divides the width)
    act_noise: dict[str, np.ndarray] | None = None

    def input_noise(self, role: Role, codec: str | None) -> np.ndarray | None:
        """Mean squared activation rounding error per input channel of linear ``role`` under
        ``codec`` (None: no rounding, or statistics collected before it was measured)."""
        if codec is None or self.act_noise is None:
            return None
        return self.act_noise.get(f"{ROLE_INPUT[Role(role)]}.{codec}")

    def means(self) -> LayerMeans:
        """The mean inputs bias compensation needs (``edgeq.ir.LayerMeans``)."""
        if self.z_mean is None or self.o_mean is None:
            raise EdgeqError("calibration statistics lack the mean inputs of down_proj / o_proj "
                             "(collected by an older edgeq); recalibrate")
        return LayerMeans(down=np.asarray(self.z_mean), o=np.asarray(self.o_mean))

    def input_cov(self, role: Role) -> np.ndarray:
        """The input covariance (mean X^T X, float64) of this layer's linear ``role``."""
        cov = {Role.Q: self.attn_xx, Role.K: self.attn_xx, Role.V: self.attn_xx, Role.O: self.o_xx,
               Role.GATE: self.ffn_xx, Role.UP: self.ffn_xx, Role.DOWN: self.mlp_zz}[Role(role)]
        if cov is None:
            raise EdgeqError(f"calibration statistics lack the input covariance of {Role(role).value} "
                             "(collected by an older edgeq); recalibrate")
        return cov


@dataclass
class CalibStats:
    layers: tuple[LayerStats, ...]
    n_samples: int
    seq_len: int
    source: dict = field(default_factory=dict)  # JSON-serialisable provenance

    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "n_samples": np.asarray(self.n_samples, dtype=np.int64),
            "seq_len": np.asarray(self.seq_len, dtype=np.int64),
            "num_layers": np.asarray(len(self.layers), dtype=np.int64),
            "source": np.asarray(json.dumps(self.source, sort_keys=True)),
        }
        for i, L in enumerate(self.layers):
            for name in _LAYER_FIELDS:
                if getattr(L, name) is not None:
                    arrays[f"layer{i}.{name}"] = np.asarray(getattr(L, name), dtype=np.float64)
            for key, a in (L.act_noise or {}).items():
                arrays[f"layer{i}.noise.{key}"] = np.asarray(a, dtype=np.float64)
            arrays[f"layer{i}.angular"] = np.asarray(L.angular, dtype=np.float64)
            arrays[f"layer{i}.n_tokens"] = np.asarray(L.n_tokens, dtype=np.int64)
        with open(path, "wb") as f:  # np.savez(path) would append ".npz" to a path without it
            np.savez(f, **arrays)

    @staticmethod
    def load(path: str | Path) -> "CalibStats":
        path = Path(path)
        if not path.is_file():
            raise EdgeqError(f"{path}: calibration statistics not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                n = int(z["num_layers"])
                layers = tuple(LayerStats(**{name: z[f"layer{i}.{name}"] for name in _LAYER_FIELDS
                                             if f"layer{i}.{name}" in z.files or name in _REQUIRED},
                                          act_noise=_noise_fields(z, i),
                                          angular=float(z[f"layer{i}.angular"]),
                                          n_tokens=int(z[f"layer{i}.n_tokens"])) for i in range(n))
                return CalibStats(layers=layers, n_samples=int(z["n_samples"]), seq_len=int(z["seq_len"]),
                                  source=json.loads(str(z["source"])))
        except (KeyError, ValueError, OSError) as exc:
            raise EdgeqError(f"{path}: not an edgeq calibration statistics file ({exc})") from None


def _noise_fields(z, i: int) -> dict[str, np.ndarray] | None:
    pre = f"layer{i}.noise."
    out = {k[len(pre):]: z[k] for k in z.files if k.startswith(pre)}
    return out or None


def _add_gram(acc: np.ndarray, x: np.ndarray) -> None:
    """``acc += x^T x`` in float64 (products and sums) with BLAS syrk: half the multiplies of
    ``x.T @ x``, into the lower triangle of the Fortran-ordered ``acc``, in place (no (n, n)
    temporary; the upper triangle is filled by :func:`_symmetrize_lower` at the end)."""
    syrk_lower(acc, x)  # (scipy's dsyrk without holding the GIL: shards on worker threads, edgeq.blas)


def _symmetrize_lower(a: np.ndarray, block: int = 1024) -> None:
    """Copy the lower triangle of the square ``a`` onto its upper one, in place, a block of rows
    at a time (temporaries of ``block`` rows, not of the whole matrix)."""
    n = a.shape[0]
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        a[i0:i1, i1:] = a[i1:, i0:i1].T
        d = a[i0:i1, i0:i1]
        iu = np.triu_indices(i1 - i0, k=1)
        d[iu] = d.T[iu]


class _Sums:
    """float64 sums of one layer over some sequences (a shard, or all of them: :meth:`merge`).

    ``ARRAYS`` / ``SCALARS``: the sums, as :meth:`parts` hands them over (to the layer's running
    sum, or back from an executor task) and :meth:`merge` adds them."""

    ARRAYS: tuple[str, ...] = ()
    SCALARS: tuple[str, ...] = ()

    def parts(self) -> dict:
        """The sums by name (the arrays themselves, not copies)."""
        return {name: getattr(self, name) for name in self.ARRAYS + self.SCALARS}

    def take(self, parts: Mapping) -> None:
        """Become a shard's sums (the first of a layer): arrays this process owns are adopted,
        others (memory maps, object-store views) copied, in their memory order."""
        for name in self.ARRAYS:
            a = parts[name]
            owned = type(a) is np.ndarray and a.flags.writeable and a.flags.owndata
            setattr(self, name, a if owned else np.array(a, order="K"))
        for name in self.SCALARS:
            setattr(self, name, parts[name])

    def merge(self, parts: Mapping) -> None:
        """Add another shard's sums (element by element: the same bits whatever the layouts)."""
        for name in self.ARRAYS:
            a = getattr(self, name)
            np.add(a, parts[name], out=a)
        for name in self.SCALARS:
            setattr(self, name, getattr(self, name) + parts[name])


class _Accumulator(_Sums):
    """float64 sums for one layer; fixed size whatever the number of sequences. Called as the
    ``taps`` of :func:`runtimes.reference.layer_forward` (one sequence per call), it adds each
    activation's contribution; :meth:`add_sequence` then adds the layer's input/output comparison."""

    NOISE = tuple(f"noise_{inp}_{c}" for inp in act_noise.INPUTS for c in act_noise.CODECS)
    ARRAYS = ("zz", "xx", "oo", "ff", "q", "k", "z_sum", "o_sum") + NOISE
    SCALARS = ("angular", "n_tokens", "n_seqs")

    def __init__(self, hp, zeros: bool = True):
        """``zeros=False``: no sums yet (:meth:`take` gives them)."""
        f, h, H, KV, D = hp.intermediate_size, hp.hidden_size, hp.num_heads, hp.num_kv_heads, hp.head_dim
        self.H, self.KV, self.half = H, KV, D // 2
        # the o_proj input arrives in the runtime's column order; IR order = these indices of it
        self.o_order = np.argsort(pruning_layout(hp)[3])
        if not zeros:
            return
        # Gram matrices: lower triangles accumulated in place by BLAS syrk (Fortran order)
        self.zz = np.zeros((f, f), dtype=np.float64, order="F")
        self.xx = np.zeros((h, h), dtype=np.float64, order="F")
        self.oo = np.zeros((H * D, H * D), dtype=np.float64, order="F")
        self.ff = np.zeros((h, h), dtype=np.float64, order="F")
        self.q = np.zeros((H, D), dtype=np.float64)
        self.k = np.zeros((KV, D), dtype=np.float64)
        self.z_sum = np.zeros(f, dtype=np.float64)
        self.o_sum = np.zeros(H * D, dtype=np.float64)
        widths = {"attn": h, "o": H * D, "ffn": h, "down": f}
        for inp in act_noise.INPUTS:
            for c in act_noise.CODECS:
                setattr(self, f"noise_{inp}_{c}", np.zeros(widths[inp], dtype=np.float64))
        self.angular = 0.0
        self.n_tokens = 0
        self.n_seqs = 0

    def _noise(self, inp: str, a: np.ndarray) -> None:
        for c, v in act_noise.noise_sums(a).items():
            acc = getattr(self, f"noise_{inp}_{c}")
            acc += v

    def __call__(self, name: str, a: np.ndarray) -> None:
        if name in TAP_INPUT:
            self._noise(TAP_INPUT[name], a)
        if name == "attn_in":
            _add_gram(self.xx, a)
        elif name == "q":
            self.q += _head_major_energy(a, self.H, self.half)
        elif name == "k":
            self.k += _head_major_energy(a, self.KV, self.half)
        elif name == "o_in":
            _add_gram(self.oo, a)  # runtime column order; IR order in result()
            self.o_sum += a.sum(axis=0, dtype=np.float64)
        elif name == "ffn_in":
            _add_gram(self.ff, a)
        elif name == "down_in":
            _add_gram(self.zz, a)
            self.z_sum += a.sum(axis=0, dtype=np.float64)

    def add_sequence(self, x_in: np.ndarray, x_out: np.ndarray) -> None:
        """After the layer ran on one sequence (``x_in`` -> ``x_out``, (T, hidden)): count its tokens
        and add 1 - cos of the layer's input and output residual stream at the last token."""
        self.n_tokens += x_in.shape[0]
        x_in_last, x_out_last = x_in[-1].astype(np.float64), x_out[-1].astype(np.float64)
        denom = np.linalg.norm(x_in_last) * np.linalg.norm(x_out_last)
        self.angular += 1.0 - (float(x_in_last @ x_out_last) / denom if denom > 0 else 1.0)
        self.n_seqs += 1

    def result(self) -> LayerStats:
        n = max(self.n_tokens, 1)
        for a in (self.zz, self.xx, self.oo, self.ff):  # the lower triangles -> symmetric matrices
            _symmetrize_lower(a)
        self.oo = np.ascontiguousarray(self.oo[np.ix_(self.o_order, self.o_order)])
        self.zz, self.xx, self.ff = (np.ascontiguousarray(a) for a in (self.zz, self.xx, self.ff))
        for a in (self.zz, self.xx, self.q, self.k, self.oo, self.ff):  # in place: no second copy
            a /= n
        z_mean, o_mean = _means(self.z_sum, self.o_sum, self.o_order, n)
        noise = {}
        for inp in act_noise.INPUTS:
            for c in act_noise.CODECS:
                width = getattr(self, f"noise_{inp}_{c}").shape[0]
                if width % act_noise.BLOCK[c]:
                    continue  # a codec that cannot serve this input (its weights cannot be of that type)
                v = getattr(self, f"noise_{inp}_{c}") / n
                noise[f"{inp}.{c}"] = v[self.o_order] if inp == "o" else v  # o_proj input: IR order
        return LayerStats(mlp_zz=self.zz, attn_xx=self.xx, q_diag=self.q, k_diag=self.k,
                          angular=self.angular / max(self.n_seqs, 1), n_tokens=self.n_tokens,
                          o_xx=self.oo, ffn_xx=self.ff, z_mean=z_mean, o_mean=o_mean, act_noise=noise)


def _means(z_sum: np.ndarray, o_sum: np.ndarray, o_order: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums over ``n`` tokens -> (z_mean, o_mean); o from the runtime's column order to the IR's."""
    return z_sum / n, o_sum[o_order] / n


class _MeanAccumulator(_Sums):
    """Only the mean inputs of down_proj and o_proj (:func:`collect_means`)."""

    ARRAYS = ("z_sum", "o_sum")
    SCALARS = ("n_tokens",)

    def __init__(self, hp, zeros: bool = True):
        self.o_order = np.argsort(pruning_layout(hp)[3])
        if not zeros:
            return
        self.z_sum = np.zeros(hp.intermediate_size, dtype=np.float64)
        self.o_sum = np.zeros(hp.num_heads * hp.head_dim, dtype=np.float64)
        self.n_tokens = 0

    def __call__(self, name: str, a: np.ndarray) -> None:
        if name == "o_in":
            self.o_sum += a.sum(axis=0, dtype=np.float64)
        elif name == "down_in":
            self.z_sum += a.sum(axis=0, dtype=np.float64)

    def add_sequence(self, x_in: np.ndarray, x_out: np.ndarray) -> None:
        self.n_tokens += x_in.shape[0]

    def result(self) -> LayerMeans:
        z, o = _means(self.z_sum, self.o_sum, self.o_order, max(self.n_tokens, 1))
        return LayerMeans(down=z, o=o)


# what a shard sums: "stats" (calibrate), "means" (collect_means)
KINDS = {"stats": _Accumulator, "means": _MeanAccumulator}


def _head_major_energy(a: np.ndarray, n_heads: int, half: int) -> np.ndarray:
    """Sum over tokens of ``a**2`` (float64) for a Q/K projection ``a`` (T, head_dim * n_heads) in the
    reference runtime's (pair slot, half, head) row order -> (n_heads, head_dim) in the IR's row
    order (head, half, pair slot)."""
    e = np.square(a.reshape(-1, half, 2, n_heads)).sum(axis=0, dtype=np.float64)
    return e.transpose(2, 1, 0).reshape(n_heads, 2 * half)


def _check_sequences(ir: ModelIR, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    if not sequences:
        raise EdgeqError("no calibration sequences")
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1 or 0 in lengths:
        raise EdgeqError(f"calibration sequences must be non-empty and of equal length (no padding), "
                         f"got lengths {sorted(lengths)[:5]}")
    ir.validate()
    hp = ir.hparams
    ids_all = []
    for seq in sequences:
        ids = np.asarray(seq, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= hp.vocab_size:
            raise EdgeqError(f"calibration token id out of range [0, {hp.vocab_size})")
        ids_all.append(ids)
    return ids_all


# ---- shards ------------------------------------------------------------------------------------

# Samples per shard (a constant: shard boundaries never depend on the number of workers).
SHARD_SAMPLES = 8

# A shard runner: ``runner(hp, layer, kind, n_shards, inputs)`` -> ``(parts, outputs)`` of each
# shard in shard order, ``inputs(k)`` the input residual streams of shard ``k`` (read when the
# shard starts), ``parts`` its sums (``_Sums.parts``), ``outputs`` the layer's outputs.
ShardRunner = Callable[..., Iterator[tuple[dict, list]]]


def shard_bounds(n_samples: int, size: int = SHARD_SAMPLES) -> list[tuple[int, int]]:
    """``[start, stop)`` of each shard of ``size`` consecutive samples (the last may be shorter)."""
    if size < 1:
        raise EdgeqError(f"calibration shards need at least one sample each, got {size}")
    return [(a, min(int(n_samples), a + size)) for a in range(0, int(n_samples), size)]


def run_shard(hp, layer: LayerWeights, kind: str, xs: Sequence[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
    """One layer on one shard's sequences ``xs`` (each (T, hidden) float32), in order, at rate 0:
    the shard's sums from zero (``KINDS[kind]``, as :meth:`_Sums.parts`) and the layer's outputs.
    The same function wherever the shard runs (this thread, a worker thread, an executor task)."""
    acc = KINDS[kind](hp)
    # the reference runtime's layer forward at rate 0, in float32, one sequence per call (positions
    # 0..T-1; a KV buffer of T positions of this shard's own, rewritten by each call)
    widths, inv_freq = full_widths(hp), rope_inv_freq(hp.head_dim, hp.rope_theta)
    T = xs[0].shape[0] if len(xs) else 0
    kc = np.zeros((T, hp.num_kv_heads, 2, hp.head_dim // 2), dtype=np.float32)
    vc = np.zeros((T, hp.num_kv_heads, hp.head_dim), dtype=np.float32)
    ys = []
    for x in xs:
        y = layer_forward(hp, layer, x, 0, widths, kc, vc, inv_freq, np.float32, taps=acc)
        acc.add_sequence(x, y)
        ys.append(y)
    return acc.parts(), ys


def thread_shards(workers: int | None = None) -> ShardRunner:
    """Shards on up to ``workers`` threads of this process (default ``EDGEQ_THREADS``, else the
    CPU count, at most 4), at most ``workers`` of them in flight (``edgeq.streaming.ordered_map``)."""
    def run(hp, layer, kind, n_shards, inputs):
        w = min(int(workers or worker_threads()), n_shards)
        return ordered_map(lambda k: run_shard(hp, layer, kind, inputs(k)), range(n_shards), w)

    return run


def _stream_layers(ir: ModelIR, ids_all: list[np.ndarray], kind: str, finish, progress: bool, desc: str,
                   runner: ShardRunner, shard_samples: int) -> list:
    """Run the sequences through ``ir`` at rate 0, a layer at a time, a shard at a time (``runner``);
    per layer the shards' sums (``KINDS[kind]``) are added in shard order, and ``finish(sums)``
    makes what is kept of them."""
    # Layer by layer: the residual streams of all sequences (n x T x hidden float32) move from
    # layer to layer; one layer's weights and a few sets of accumulators are in memory at a time,
    # and each layer's statistics are parked on disk inside ``edgeq.spill.spilling``. Every
    # sequence sees exactly the ops of a whole-model forward; the sums are per shard, added in
    # shard order (module doc: Shards).
    hp = ir.hparams
    embd = ir.tensors["token_embd"]
    xs = [np.stack([np.asarray(embd[int(t):int(t) + 1], dtype=np.float32)[0] for t in ids]) for ids in ids_all]
    if hp.embedding_scale != 1.0:  # (Gemma) in float32, as the reference runtime's forward
        xs = [x * np.float32(hp.embedding_scale) for x in xs]
    bounds = shard_bounds(len(xs), shard_samples)
    bar = None
    if progress:
        bar = tqdm(total=hp.num_layers * len(xs), desc=desc, unit="seq", leave=False)
    layers = []
    with one_blas_thread():  # (BLAS on one thread per worker, also outside a build step: edgeq.blas)
        for li in range(hp.num_layers):
            layers.append(_stream_layer(ir, li, xs, bounds, kind, finish, runner, bar))
    if bar is not None:
        bar.close()
    return layers


def _stream_layer(ir: ModelIR, li: int, xs: list[np.ndarray], bounds: list[tuple[int, int]], kind: str, finish,
                  runner: ShardRunner, bar):
    """Layer ``li`` on every shard; ``xs`` (the residual streams) replaced by its outputs."""
    hp = ir.hparams
    L = LayerWeights(ir, li, np.float32)
    total, done = None, 0
    for parts, ys in runner(hp, L, kind, len(bounds), lambda k: xs[bounds[k][0]:bounds[k][1]]):
        if done >= len(bounds):
            raise EdgeqError(f"calibration layer {li}: more shard results than its {len(bounds)} shards")
        a, b = bounds[done]
        if len(ys) != b - a:
            raise EdgeqError(f"calibration layer {li}, shard {done}: {len(ys)} outputs for {b - a} sequences")
        xs[a:b] = ys
        if total is None:
            total = KINDS[kind](hp, zeros=False)
            total.take(parts)
        else:
            total.merge(parts)
        del parts, ys  # (before the next shard starts: at most workers + 1 sets of sums)
        done += 1
        if bar is not None:
            bar.update(b - a)
    if done != len(bounds):
        raise EdgeqError(f"calibration layer {li}: {done} shard results for {len(bounds)} shards")
    del L
    return finish(total)


def calibrate(ir: ModelIR, sequences: Sequence[Sequence[int]], progress: bool = True,
              source: Mapping | None = None, workers: int | None = None, runner: ShardRunner | None = None,
              shard_samples: int = SHARD_SAMPLES) -> CalibStats:
    """Stream ``sequences`` (equal lengths) through ``ir`` at rate 0 and return the statistics.

    ``source``: extra provenance stored in ``CalibStats.source`` (e.g. the data set). The shards
    (module doc) run on ``workers`` threads (:func:`thread_shards`) or through ``runner`` (an
    executor's: ``edgeq.pipeline.split``); the statistics are the same bits either way."""
    ids_all = _check_sequences(ir, sequences)

    def finish(acc):
        res = acc.result()
        for name in _LAYER_FIELDS:
            setattr(res, name, spill_array(getattr(res, name)))
        return res

    layers = _stream_layers(ir, ids_all, "stats", finish, progress, "calibrating", runner or thread_shards(workers),
                            shard_samples)
    src = {"model": str(ir.source.get("path", "")), "history": [r.name for r in ir.history],
           "n_tokens": len(sequences) * len(sequences[0])}
    src.update(dict(source or {}))
    return CalibStats(layers=tuple(layers), n_samples=len(sequences),
                      seq_len=len(sequences[0]), source=src)


def collect_means(ir: ModelIR, sequences: Sequence[Sequence[int]], progress: bool = True,
                  workers: int | None = None, runner: ShardRunner | None = None,
                  shard_samples: int = SHARD_SAMPLES) -> list[LayerMeans]:
    """Per layer, the mean inputs of down_proj and o_proj over ``sequences`` at rate 0 on ``ir`` as
    it is now (its current column order): the means :func:`calibrate` also collects, without the
    Gram matrices, over the same shards (the same bits). Memory: one layer's weights and the
    sequences' residual streams."""
    ids_all = _check_sequences(ir, sequences)
    return _stream_layers(ir, ids_all, "means", lambda acc: acc.result(), progress, "mean inputs",
                          runner or thread_shards(workers), shard_samples)

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
SmolLM2-135M):

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

:func:`collect_means` gathers only ``z_mean`` / ``o_mean`` (no Gram matrices: the cost of the
forward alone) on a model as it is now, e.g. after the sorts changed the column order of the
statistics :func:`calibrate` collected before them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.linalg.blas import dsyrk as syrk
from tqdm import tqdm

import edgeq
from edgeq.errors import EdgeqError
from edgeq.ir import LayerMeans, ModelIR, Role, TokenizerSpec, full_widths
from edgeq.spill import spill_array
from runtimes.reference import LayerWeights, layer_forward, pruning_layout, rope_inv_freq
from runtimes.text import SpecTokenizer, render_chat

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
                                          angular=float(z[f"layer{i}.angular"]),
                                          n_tokens=int(z[f"layer{i}.n_tokens"])) for i in range(n))
                return CalibStats(layers=layers, n_samples=int(z["n_samples"]), seq_len=int(z["seq_len"]),
                                  source=json.loads(str(z["source"])))
        except (KeyError, ValueError, OSError) as exc:
            raise EdgeqError(f"{path}: not an edgeq calibration statistics file ({exc})") from None


def _add_gram(acc: np.ndarray, x: np.ndarray) -> None:
    """``acc += x^T x`` in float64 (products and sums) with BLAS syrk: half the multiplies of
    ``x.T @ x``, into the lower triangle of the Fortran-ordered ``acc``, in place (no (n, n)
    temporary; the upper triangle is filled by :func:`_symmetrize_lower` at the end)."""
    syrk(1.0, np.asarray(x, dtype=np.float64), beta=1.0, c=acc, trans=1, lower=1, overwrite_c=1)


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


class _Accumulator:
    """float64 sums for one layer; fixed size whatever the number of sequences. Called as the
    ``taps`` of :func:`runtimes.reference.layer_forward` (one sequence per call), it adds each
    activation's contribution; :meth:`add_sequence` then adds the layer's input/output comparison."""

    def __init__(self, hp):
        f, h, H, KV, D = hp.intermediate_size, hp.hidden_size, hp.num_heads, hp.num_kv_heads, hp.head_dim
        self.H, self.KV, self.half = H, KV, D // 2
        # the o_proj input arrives in the runtime's column order; IR order = these indices of it
        self.o_order = np.argsort(pruning_layout(hp)[3])
        # Gram matrices: lower triangles accumulated in place by BLAS syrk (Fortran order)
        self.zz = np.zeros((f, f), dtype=np.float64, order="F")
        self.xx = np.zeros((h, h), dtype=np.float64, order="F")
        self.oo = np.zeros((H * D, H * D), dtype=np.float64, order="F")
        self.ff = np.zeros((h, h), dtype=np.float64, order="F")
        self.q = np.zeros((H, D), dtype=np.float64)
        self.k = np.zeros((KV, D), dtype=np.float64)
        self.z_sum = np.zeros(f, dtype=np.float64)
        self.o_sum = np.zeros(H * D, dtype=np.float64)
        self.angular = 0.0
        self.n_tokens = 0
        self.n_seqs = 0

    def __call__(self, name: str, a: np.ndarray) -> None:
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
        return LayerStats(mlp_zz=self.zz, attn_xx=self.xx, q_diag=self.q, k_diag=self.k,
                          angular=self.angular / max(self.n_seqs, 1), n_tokens=self.n_tokens,
                          o_xx=self.oo, ffn_xx=self.ff, z_mean=z_mean, o_mean=o_mean)


def _means(z_sum: np.ndarray, o_sum: np.ndarray, o_order: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums over ``n`` tokens -> (z_mean, o_mean); o from the runtime's column order to the IR's."""
    return z_sum / n, o_sum[o_order] / n


class _MeanAccumulator:
    """Only the mean inputs of down_proj and o_proj (:func:`collect_means`)."""

    def __init__(self, hp):
        self.o_order = np.argsort(pruning_layout(hp)[3])
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


def _stream_layers(ir: ModelIR, ids_all: list[np.ndarray], make_acc, finish, progress: bool, desc: str) -> list:
    """Run the sequences through ``ir`` at rate 0, a layer at a time; per layer a fresh accumulator
    ``make_acc(hp)`` is the forward's taps, and ``finish(acc)`` makes what is kept of it."""
    # Layer by layer: the residual streams of all sequences (n x T x hidden float32) move from
    # layer to layer; one layer's weights and accumulators are in memory at a time, and each
    # layer's statistics are parked on disk inside ``edgeq.spill.spilling``. Every sequence sees
    # exactly the ops of a whole-model forward, and each accumulator sums the sequences in order,
    # so the statistics equal a sequence-by-sequence pass bit for bit.
    hp = ir.hparams
    embd = ir.tensors["token_embd"]
    xs = [np.stack([np.asarray(embd[int(t):int(t) + 1], dtype=np.float32)[0] for t in ids]) for ids in ids_all]
    if hp.embedding_scale != 1.0:  # (Gemma) in float32, as the reference runtime's forward
        xs = [x * np.float32(hp.embedding_scale) for x in xs]
    # the reference runtime's layer forward at rate 0, in float32, one sequence per call (positions
    # 0..T-1; a KV buffer of T positions, rewritten by each call); the accumulator is its taps
    widths, inv_freq, T = full_widths(hp), rope_inv_freq(hp.head_dim, hp.rope_theta), len(ids_all[0])
    kc = np.zeros((T, hp.num_kv_heads, 2, hp.head_dim // 2), dtype=np.float32)
    vc = np.zeros((T, hp.num_kv_heads, hp.head_dim), dtype=np.float32)
    bar = None
    if progress:
        bar = tqdm(total=hp.num_layers * len(xs), desc=desc, unit="seq", leave=False)
    layers = []
    for li in range(hp.num_layers):
        L = LayerWeights(ir, li, np.float32)
        acc = make_acc(hp)
        for si in range(len(xs)):
            y = layer_forward(hp, L, xs[si], 0, widths, kc, vc, inv_freq, np.float32, taps=acc)
            acc.add_sequence(xs[si], y)
            xs[si] = y
            if bar is not None:
                bar.update(1)
        del L
        layers.append(finish(acc))
        del acc
    if bar is not None:
        bar.close()
    return layers


def calibrate(ir: ModelIR, sequences: Sequence[Sequence[int]], progress: bool = True,
              source: Mapping | None = None) -> CalibStats:
    """Stream ``sequences`` (equal lengths) through ``ir`` at rate 0 and return the statistics.

    ``source``: extra provenance stored in ``CalibStats.source`` (e.g. the data set)."""
    ids_all = _check_sequences(ir, sequences)

    def finish(acc):
        res = acc.result()
        for name in _LAYER_FIELDS:
            setattr(res, name, spill_array(getattr(res, name)))
        return res

    layers = _stream_layers(ir, ids_all, _Accumulator, finish, progress, "calibrating")
    src = {"model": str(ir.source.get("path", "")), "history": [r.name for r in ir.history],
           "n_tokens": len(sequences) * len(sequences[0])}
    src.update(dict(source or {}))
    return CalibStats(layers=tuple(layers), n_samples=len(sequences),
                      seq_len=len(sequences[0]), source=src)


def collect_means(ir: ModelIR, sequences: Sequence[Sequence[int]], progress: bool = True) -> list[LayerMeans]:
    """Per layer, the mean inputs of down_proj and o_proj over ``sequences`` at rate 0 on ``ir`` as
    it is now (its current column order): the means :func:`calibrate` also collects, without the
    Gram matrices. Memory: one layer's weights and the sequences' residual streams."""
    ids_all = _check_sequences(ir, sequences)
    return _stream_layers(ir, ids_all, _MeanAccumulator, lambda acc: acc.result(), progress, "mean inputs")

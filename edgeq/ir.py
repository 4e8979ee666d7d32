"""ModelIR: the one data structure every front end produces and every pass / lowering reads.

Numpy only (no torch), so device-side runtimes can import it.

Conventions
-----------
* Linear weights are float32 arrays of shape ``(out_features, in_features)`` (the Hugging Face
  layout), named with GGUF-style canonical names: ``blk.{i}.attn_q`` ... ``blk.{i}.ffn_down``.
* Q/K weights are kept in the Hugging Face "rotate-half" RoPE convention (pair j is
  ``(j, j + head_dim/2)``); a lowering that needs another convention permutes on the way out.
* Non-linear tensors live in ``ModelIR.tensors``: ``token_embd`` (vocab, hidden),
  ``output_norm``, ``output`` (only when embeddings are untied), ``blk.{i}.attn_norm``,
  ``blk.{i}.ffn_norm`` (plus, per :func:`block_norm_names`, Gemma's ``attn_q_norm`` /
  ``attn_k_norm`` / ``post_attention_norm`` / ``post_ffw_norm``).
* Norm weights are the *effective* multipliers ``x / rms(x) * w`` — what llama.cpp's GGUFs
  store. A family whose checkpoints store ``w - 1`` (Gemma's ``(1 + w)`` convention) is
  converted by its front end (``Family.hf_norm_offset``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping

import numpy as np

from edgeq.errors import EdgeqError


class Arch(str, Enum):
    LLAMA = "llama"
    QWEN2 = "qwen2"
    GEMMA3 = "gemma3"


# HParams.layer_types entries (Hugging Face's names)
SLIDING, FULL = "sliding_attention", "full_attention"


class Role(str, Enum):
    Q = "attn_q"
    K = "attn_k"
    V = "attn_v"
    O = "attn_output"
    GATE = "ffn_gate"
    UP = "ffn_up"
    DOWN = "ffn_down"


HIDDEN_ACTS = ("silu", "gelu_tanh")
QK_NORMS = ("attn_q_norm", "attn_k_norm")


def block_norm_names(hp: "HParams") -> tuple[str, ...]:
    """The norm tensors of each block (``blk.N.<name>``), in the order the forward uses them."""
    names = ["attn_norm"]
    if hp.qk_norm:
        names += QK_NORMS
    if hp.sandwich_norm:
        names.append("post_attention_norm")
    names.append("ffn_norm")
    if hp.sandwich_norm:
        names.append("post_ffw_norm")
    return tuple(names)


def linear_name(layer: int, role: Role) -> str:
    return f"blk.{layer}.{role.value}"


@dataclass(frozen=True)
class HParams:
    arch: Arch
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v carry biases (Qwen2)
    # --- the forward's family blocks (defaults: the Llama forward; Gemma 3 sets them all) ---
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" | "gelu_tanh"
    embedding_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: float32(sqrt(hidden)))
    query_pre_attn_scalar: float | None = None  # attention scores scale by its -1/2 power (None: head_dim)
    qk_norm: bool = False  # RMSNorm over each Q/K head (blk.N.attn_q_norm / attn_k_norm, head_dim) before RoPE
    sandwich_norm: bool = False  # RMSNorm on the attention / MLP outputs before the residual add
    sliding_window: int | None = None  # keys a sliding-attention layer sees: query pos - key pos < this
    layer_types: tuple[str, ...] | None = None  # per layer SLIDING or FULL (None: all full)
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (None: rope_theta)

    def to_json(self) -> dict:
        """JSON form; the family-block fields are written only where they differ from the
        defaults (so Llama / Qwen2 manifests are as before)."""
        d = dataclasses.asdict(self)
        d["arch"] = self.arch.value
        for f in dataclasses.fields(self):
            if f.name in _OPTIONAL_FIELDS and d[f.name] == f.default:
                del d[f.name]
        if d.get("layer_types") is not None:
            d["layer_types"] = list(d["layer_types"])
        return d

    @staticmethod
    def from_json(d: Mapping) -> "HParams":
        d = dict(d)
        d["arch"] = Arch(d["arch"])
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        return HParams(**d)

    def special_blocks(self) -> tuple[str, ...]:
        """The family-block fields that differ from the Llama forward (empty for Llama / Qwen2):
        what a lowering or pass that implements only that forward must refuse."""
        return tuple(f.name for f in dataclasses.fields(self)
                     if f.name in _OPTIONAL_FIELDS and getattr(self, f.name) != f.default)

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends within the sliding window (a local layer)."""
        return self.layer_types is not None and self.layer_types[layer] == SLIDING

    def layer_rope_theta(self, layer: int) -> float:
        """The RoPE base of ``layer``: the local base on sliding layers, else ``rope_theta``."""
        if self.is_sliding(layer) and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    @property
    def attention_scale(self) -> float:
        """What attention scores are multiplied by: ``query_pre_attn_scalar ** -0.5``, by default
        ``head_dim ** -0.5``."""
        return 1.0 / float(np.sqrt(self.query_pre_attn_scalar or self.head_dim))


_OPTIONAL_FIELDS = ("hidden_act", "embedding_scale", "query_pre_attn_scalar", "qk_norm", "sandwich_norm",
                    "sliding_window", "layer_types", "rope_local_theta")


# TokenizerSpec.model values: llama.cpp's tokenizer.ggml.model names
TOKENIZER_BPE = "gpt2"  # byte-level BPE
TOKENIZER_SPM = "llama"  # SentencePiece-style (scores, byte fallback)


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to tokenize and to write a tokenizer into an artifact.

    ``tokenizer_json`` is the Hugging Face ``tokenizer.json`` text (loadable by the
    ``tokenizers`` library without torch); the other fields are derived from it and from
    ``tokenizer_config.json`` so that lowerings need not re-parse.
    """

    tokenizer_json: str
    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece-style BPE)
    pre: str  # llama.cpp pre-tokenizer name, e.g. "smollm", "qwen2", "default"
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # llama.cpp token types: 1 normal, 3 control, 4 user-defined
    merges: tuple[str, ...]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    chat_template: str | None
    # SentencePiece-style vocabularies (model "llama"): llama.cpp's per-token merge scores and
    # whether it prepends a space to the text (None for byte-level BPE: not written)
    scores: tuple[float, ...] | None = None
    add_space_prefix: bool | None = None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("scores", "add_space_prefix"):  # byte-level BPE specs serialise as before
            if d[key] is None:
                del d[key]
        return d

    @staticmethod
    def from_json(d: Mapping) -> "TokenizerSpec":
        """Inverse of :meth:`to_json` (JSON lists back to tuples); TypeError on unknown/missing keys."""
        return TokenizerSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class LowRank:
    """``y += scale * (x @ a.T) @ b.T`` — a LoRA adapter or an error-compensation branch."""

    a: np.ndarray  # (rank, in_features)
    b: np.ndarray  # (out_features, rank)
    scale: float
    source: str  # "lora:<adapter name>" | "qerr"

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> np.ndarray:
        return (self.scale * (self.b.astype(np.float64) @ self.a.astype(np.float64))).astype(np.float32)


@dataclass(frozen=True)
class Packed:
    """A weight stored in a quantized format: ``data`` is (out, row_nbytes) uint8, rows in IR order."""

    qtype: str  # a GGML type name (edgeq.quant.QType value)
    data: np.ndarray


@dataclass(frozen=True)
class Linear:
    name: str
    role: Role
    layer: int
    weight: np.ndarray  # float32 (out, in)
    bias: np.ndarray | None = None
    low_rank: tuple[LowRank, ...] = ()
    # Grid-exact quantized form of ``weight`` (GPTQ / RTN codes packed in a storage format);
    # ``weight`` then holds exactly its dequantized values. Lowerings write it as is (lossless)
    # after checking that it still decodes to ``weight`` (a pass that changed the weight since
    # must drop it: ``dataclasses.replace(lin, weight=w, packed=None)``).
    packed: "Packed | None" = None

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])


@dataclass(frozen=True)
class LayerWidths:
    """What one layer keeps at one pruning rate (prefixes of the sorted dimensions)."""

    ffn: int  # intermediate channels kept (prefix of the sorted MLP channels)
    qk_pairs: int  # RoPE pairs kept per Q/K head (dims [0:p] and [d/2 : d/2+p] of the sorted head)
    v_dims: int  # V/O components kept per KV group (prefix of the sorted SVD components)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def full_widths(hp: HParams) -> LayerWidths:
    """The widths that keep everything (pruning rate 0)."""
    return LayerWidths(ffn=hp.intermediate_size, qk_pairs=hp.head_dim // 2, v_dims=hp.head_dim)


def linear_shapes(hp: HParams) -> dict[Role, tuple[int, int]]:
    """(out, in) of each block linear."""
    q_out, kv_out = hp.num_heads * hp.head_dim, hp.num_kv_heads * hp.head_dim
    h, f = hp.hidden_size, hp.intermediate_size
    return {Role.Q: (q_out, h), Role.K: (kv_out, h), Role.V: (kv_out, h), Role.O: (h, q_out),
            Role.GATE: (f, h), Role.UP: (f, h), Role.DOWN: (h, f)}


def weight_matrix_shapes(hp: HParams) -> dict[str, tuple[int, int]]:
    """Every 2-D weight of the model: the embedding, the untied output head, the block linears."""
    out = {"token_embd": (hp.vocab_size, hp.hidden_size)}
    if not hp.tie_word_embeddings:
        out["output"] = (hp.vocab_size, hp.hidden_size)
    per_role = linear_shapes(hp)
    for i in range(hp.num_layers):
        for role, shape in per_role.items():
            out[linear_name(i, role)] = shape
    return out


def n_weight_params(hp: HParams) -> int:
    """Parameters in the 2-D weights (:func:`weight_matrix_shapes`; norms and biases not counted)."""
    return sum(a * b for a, b in weight_matrix_shapes(hp).values())


@dataclass(frozen=True)
class PruneSpec:
    """The pruning rates an artifact carries and, for each, every layer's kept widths.

    ``widths[rate][layer]``; rate 0 keeps everything. Rates are global averages over the
    prunable parameters (see edgeq.passes.rate_plan)."""

    rates: tuple[float, ...]
    widths: Mapping[float, tuple[LayerWidths, ...]]
    granularity: int  # kept widths of input-dim-pruned tensors are multiples of this
    importance: str = "angular"  # "angular" | "uniform"
    dims: str = "all"  # "all": MLP channels, Q/K pairs and V/O components | "mlp": MLP channels only

    def at(self, rate: float) -> tuple[LayerWidths, ...]:
        for r in self.rates:
            if abs(r - rate) < 1e-9:
                return self.widths[r]
        raise EdgeqError(f"pruning rate {rate:g} is not carried by this model "
                         f"(available: {', '.join(f'{r:g}' for r in self.rates)})")

    def to_json(self) -> dict:
        d = {"rates": list(self.rates), "granularity": self.granularity, "importance": self.importance,
             "widths": {f"{r:g}": [w.to_json() for w in self.widths[r]] for r in self.rates}}
        if self.dims != "all":  # (specs of the default allocation serialise as before)
            d["dims"] = self.dims
        return d

    @staticmethod
    def from_json(d: Mapping) -> "PruneSpec":
        rates = tuple(float(r) for r in d["rates"])
        widths = {float(k): tuple(LayerWidths(**w) for w in v) for k, v in d["widths"].items()}
        return PruneSpec(rates=rates, widths={r: widths[next(k for k in widths if abs(k - r) < 1e-9)]
                                              for r in rates},
                         granularity=int(d["granularity"]), importance=d.get("importance", "angular"),
                         dims=d.get("dims", "all"))


@dataclass(frozen=True)
class LayerMeans:
    """Mean inputs of one layer's input-pruned linears over calibration tokens at rate 0 (bias
    compensation, ``edgeq.passes.prune_bias``): ``down`` (intermediate_size,) the mean of
    ffn_down's input ``silu(gate(x)) * up(x)``, ``o`` (num_heads * head_dim,) the mean of
    attn_output's input (the attention output), both float64 in the IR's column order."""

    down: np.ndarray
    o: np.ndarray


@dataclass(frozen=True)
class PassRecord:
    name: str
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelIR:
    hparams: HParams
    linears: Mapping[str, Linear]
    tensors: Mapping[str, np.ndarray]
    tokenizer: TokenizerSpec | None
    source: Mapping[str, object] = field(default_factory=dict)  # path, sha256 of inputs
    adapters: Mapping[str, Mapping[str, object]] = field(default_factory=dict)  # name -> info
    history: tuple[PassRecord, ...] = ()
    # Q/K RoPE-pair sort: layer -> int array (num_kv_heads, head_dim // 2); entry [g, j] is the
    # original pair index (frequency) of sorted pair slot j in KV group g (and in every query
    # head of that group). Absent layer = identity.
    rope_index: Mapping[int, np.ndarray] = field(default_factory=dict)
    prune: PruneSpec | None = None
    # Bias compensation of pruning (``--prune-bias``): layer -> its linears' mean inputs. When set,
    # a rate adds to o_proj's and ffn_down's outputs the mean contribution of the inputs it prunes
    # (``edgeq.passes.prune_bias.rate_bias``); empty: no compensation.
    prune_means: Mapping[int, LayerMeans] = field(default_factory=dict)

    @property
    def arch(self) -> Arch:
        return self.hparams.arch

    def linear(self, layer: int, role: Role) -> Linear:
        return self.linears[linear_name(layer, role)]

    def replace(self, **changes) -> "ModelIR":
        return dataclasses.replace(self, **changes)

    def without_low_rank(self) -> "ModelIR":
        """The base model: every low-rank branch dropped (what a base GGUF file holds)."""
        return self.replace(linears={k: dataclasses.replace(v, low_rank=()) for k, v in self.linears.items()})

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        hp = self.hparams
        per_role = linear_shapes(hp)
        return {linear_name(i, role): shape for i in range(hp.num_layers) for role, shape in per_role.items()}

    def validate(self) -> None:
        """Check structural invariants; raise EdgeqError naming the first violation."""
        hp = self.hparams
        if hp.num_heads % hp.num_kv_heads:
            raise EdgeqError(f"num_heads {hp.num_heads} is not a multiple of num_kv_heads {hp.num_kv_heads}")
        for name, shape in self.expected_shapes().items():
            lin = self.linears.get(name)
            if lin is None:
                raise EdgeqError(f"missing linear {name}")
            if tuple(lin.weight.shape) != shape:
                raise EdgeqError(f"{name}: expected shape {shape}, got {tuple(lin.weight.shape)}")
            if lin.weight.dtype != np.float32:
                raise EdgeqError(f"{name}: expected float32 weight, got {lin.weight.dtype}")
            if lin.bias is not None and lin.bias.shape != (shape[0],):
                raise EdgeqError(f"{name}: expected bias shape {(shape[0],)}, got {lin.bias.shape}")
            for lr in lin.low_rank:
                if lr.a.shape[1] != shape[1] or lr.b.shape[0] != shape[0] or lr.a.shape[0] != lr.b.shape[1]:
                    raise EdgeqError(
                        f"{name}: low-rank branch {lr.source} has A {lr.a.shape}, B {lr.b.shape} "
                        f"for a weight of shape {shape}")
        half = hp.head_dim // 2
        for layer, idx in self.rope_index.items():
            if idx.shape != (hp.num_kv_heads, half):
                raise EdgeqError(f"rope_index[{layer}]: expected shape {(hp.num_kv_heads, half)}, got {idx.shape}")
            for g in range(hp.num_kv_heads):
                if not np.array_equal(np.sort(idx[g]), np.arange(half)):
                    raise EdgeqError(f"rope_index[{layer}][{g}] is not a permutation of 0..{half - 1}")
        if self.prune is not None:
            self._validate_prune(self.prune)
        if self.prune_means:
            if set(self.prune_means) != set(range(hp.num_layers)):
                raise EdgeqError(f"prune_means: expected every layer 0..{hp.num_layers - 1}, got {sorted(self.prune_means)[:5]}")
            for layer, m in self.prune_means.items():
                if np.shape(m.down) != (hp.intermediate_size,) or np.shape(m.o) != (hp.num_heads * hp.head_dim,):
                    raise EdgeqError(f"prune_means[{layer}]: expected shapes ({hp.intermediate_size},) and "
                                     f"({hp.num_heads * hp.head_dim},), got {np.shape(m.down)} and {np.shape(m.o)}")
        extra = set(self.linears) - set(self.expected_shapes())
        if extra:
            raise EdgeqError(f"unexpected linears: {sorted(extra)[:3]}")
        need = {"token_embd": (hp.vocab_size, hp.hidden_size), "output_norm": (hp.hidden_size,)}
        if not hp.tie_word_embeddings:
            need["output"] = (hp.vocab_size, hp.hidden_size)
        for i in range(hp.num_layers):
            for norm in block_norm_names(hp):
                need[f"blk.{i}.{norm}"] = (hp.head_dim,) if norm in QK_NORMS else (hp.hidden_size,)
        for name, shape in need.items():
            t = self.tensors.get(name)
            if t is None:
                raise EdgeqError(f"missing tensor {name}")
            if tuple(t.shape) != shape:
                raise EdgeqError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")

        if hp.layer_types is not None and (len(hp.layer_types) != hp.num_layers
                                           or set(hp.layer_types) - {SLIDING, FULL}):
            raise EdgeqError(f"layer_types: expected {hp.num_layers} of {SLIDING!r}/{FULL!r}, "
                             f"got {list(hp.layer_types)[:4]}...")
        if hp.layer_types is not None and SLIDING in hp.layer_types and not hp.sliding_window:
            raise EdgeqError("sliding-attention layers need a sliding_window")
        if hp.hidden_act not in HIDDEN_ACTS:
            raise EdgeqError(f"hidden_act {hp.hidden_act!r} is not supported (supported: {list(HIDDEN_ACTS)})")

    def _validate_prune(self, spec: PruneSpec) -> None:
        hp = self.hparams
        if not spec.rates or spec.rates[0] != 0.0 or list(spec.rates) != sorted(set(spec.rates)):
            raise EdgeqError(f"prune rates must be sorted, unique and start at 0, got {list(spec.rates)}")
        prev = None
        for r in spec.rates:
            ws = spec.widths[r]
            if len(ws) != hp.num_layers:
                raise EdgeqError(f"prune rate {r:g}: {len(ws)} layer widths for {hp.num_layers} layers")
            for i, w in enumerate(ws):
                if not (0 < w.ffn <= hp.intermediate_size and 0 < w.qk_pairs <= hp.head_dim // 2
                        and 0 < w.v_dims <= hp.head_dim):
                    raise EdgeqError(f"prune rate {r:g}, layer {i}: widths {w} out of range")
                if prev is not None:
                    p = prev[i]
                    if w.ffn > p.ffn or w.qk_pairs > p.qk_pairs or w.v_dims > p.v_dims:
                        raise EdgeqError(f"prune rate {r:g}, layer {i}: kept widths must shrink as the rate grows")
            if spec.rates and r == 0.0 and any(
                    (w.ffn, w.qk_pairs, w.v_dims) != (hp.intermediate_size, hp.head_dim // 2, hp.head_dim) for w in ws):
                raise EdgeqError("prune rate 0 must keep every width")
            prev = ws

    def output_weight(self) -> np.ndarray:
        return self.tensors["token_embd"] if self.hparams.tie_word_embeddings else self.tensors["output"]

    def num_parameters(self) -> int:
        n = sum(l.weight.size + (0 if l.bias is None else l.bias.size) for l in self.linears.values())
        return n + sum(t.size for t in self.tensors.values())

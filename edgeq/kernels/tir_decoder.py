"""TIR (TVMScript) of the decoder around the matmul kernels, for one decode token (CPU targets).

The per-token path of a Llama / Qwen2 layer between the generated matmul kernels
(:mod:`tir_cpu`, :mod:`tir_dot`), as a few functions compiled into the same library:

* ``embed``    — the token's row of the int8 embedding table, read from the head kernel's blocked
  layout (float or integer-dot ``qw``), dequantized into ``x`` (times the embedding scale);
* ``norm``     — ``h = rmsnorm(x) * w``;
* ``add_norm`` — ``x += y + b`` (the residual add with the O / down bias and the pruning rate's
  bias compensation folded into ``b``), then ``h = rmsnorm(x) * w`` (the next norm: the MLP's,
  the next layer's attention norm or the output norm);
* ``attention`` — Q|K|V bias and the rate's masks of Q/K pairs and V components, RoPE (the
  layer's tables of cos / sin of ``pos * f`` for its gathered pair frequencies ``f``, (context,
  KV, half) each, made once per session), K and V stored into the KV cache at ``pos``, then per
  query head softmax attention over positions ``0 .. pos`` of its KV head, times the rate's
  O-component mask (``att``: a scratch row per head of at least the context rounded up to
  ``LANES``, as the softmax runs ``LANES`` positions a step);
* ``glu``      — ``silu(gate + b) * (up + b)`` (SwiGLU; GeGLU with the tanh GELU for Gemma) over
  the interleaved gate|up blocks of the gate|up kernel's output;
* ``post_add_norm`` (Gemma 3's sandwich norms) — ``x += rmsnorm(y + b) * pw``, then
  ``h = rmsnorm(x) * w``.

Gemma 3's other blocks are arguments: the embedding scale (``embed``), QK-norm (``attention`` of a
``qk_norm`` spec: RMSNorm of each Q / K head after the masks, before RoPE) and the sliding window
(``attention``'s ``win``: keys ``pos - win + 1 .. pos``; 0 for a global layer).

Shapes: the model's widths (hidden, heads, head_dim) are constants of the function (its name
carries them); the MLP width ``F`` (the pruning rate's active width), the number of layers, the
context length and the position are symbolic or read at call time, so one compiled function
serves every rate. The position and the token id are read from a small int32 ``state`` buffer
(``[pos, token]``), so every call of a token takes the same arguments and only ``state`` changes.

Numerics: float32 throughout, the same formulas as the numpy decoder (``runtimes/tvmrt.py``),
with sums in another order (vectorized partial sums) and ``exp`` as a vectorizable polynomial
(:func:`fast_exp`, within 2 ulp of libm's): equal to it within float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeq.errors import EdgeqError

ACTS = ("silu", "gelu_tanh")
LANES = 8  # partial sums of the norms' and the attention scores' reductions


@dataclass(frozen=True)
class DecoderSpec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    block: int  # the kernels' output block (gate|up interleaved by blocks of this many channels)
    dot_layout: bool = False  # the embedding table in the integer-dot layout (int8-activation kernels)
    act: str = "silu"  # the MLP's gate activation: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    qk_norm: bool = False  # RMSNorm over each Q / K head before RoPE (Gemma 3)
    sandwich: bool = False  # RMSNorm of the attention / MLP output before the residual add (Gemma 3)

    def __post_init__(self):
        if self.hidden % LANES or self.head_dim % LANES:
            raise EdgeqError(f"decoder widths must be multiples of {LANES}: hidden {self.hidden}, "
                             f"head_dim {self.head_dim}")
        if self.heads % self.kv_heads:
            raise EdgeqError(f"{self.heads} heads are not a multiple of {self.kv_heads} KV heads")
        if self.act not in ACTS:
            raise EdgeqError(f"decoder activation must be one of {ACTS}, got {self.act!r}")

    @property
    def qkv(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def names(self) -> dict[str, str]:
        """role -> function name (the spec's constants in the name: one library may hold several)."""
        h, d = self.hidden, self.head_dim
        out = {"embed": f"dec_embed_h{h}_b{self.block}{'_q8' if self.dot_layout else ''}",
               "norm": f"dec_norm_h{h}",
               "add_norm": f"dec_add_norm_h{h}",
               "attention": f"dec_attention_h{self.heads}_kv{self.kv_heads}_d{d}{'_qkn' if self.qk_norm else ''}",
               "glu": f"dec_{'swiglu' if self.act == 'silu' else 'geglu'}_b{self.block}"}
        if self.sandwich:
            out["post_add_norm"] = f"dec_post_add_norm_h{h}"
        return out

    def sources(self) -> dict[str, str]:
        """function name -> TVMScript source."""
        make = {"embed": _embed, "norm": _norm, "add_norm": _add_norm, "attention": _attention, "glu": _glu,
                "post_add_norm": _post_add_norm}
        return {name: make[role](name, self) for role, name in self.names().items()}


def func_head(name: str, args: list[str], sym: tuple[str, ...] = ()) -> str:
    lines = [f"@T.prim_func\ndef {name}({', '.join(args)}):",
             f"    T.func_attr({{\"global_symbol\": \"{name}\", \"tir.noalias\": True}})"]
    lines += [f"    {v} = T.int64()" for v in sym]
    return "\n".join(lines) + "\n"


def signature(role: str, name: str, spec: DecoderSpec) -> str:
    """The function header and argument buffers of a decoder function (``role`` of
    :meth:`DecoderSpec.names`): the same for the CPU form here and the CUDA form
    (:mod:`edgeq.kernels.tir_decoder_cuda`), so the runtime's call lists serve both."""
    H, V, D = spec.hidden, spec.block, spec.head_dim
    f32, hv, h1 = "float32", f"({H},)", f"(1, {H})"
    sym: tuple[str, ...] = ()
    if role == "norm":
        bufs, scalars = [("x", h1, f32), ("w", hv, f32), ("h", h1, f32)], ["eps: T.float32"]
    elif role == "add_norm":
        bufs = [("x", h1, f32), ("y", h1, f32), ("b", hv, f32), ("w", hv, f32), ("h", h1, f32)]
        scalars = ["eps: T.float32"]
    elif role == "post_add_norm":
        bufs = [("x", h1, f32), ("y", h1, f32), ("b", hv, f32), ("pw", hv, f32), ("w", hv, f32), ("h", h1, f32)]
        scalars = ["eps: T.float32"]
    elif role == "embed":
        qw_shape = f"(NB, {H // 4}, {4 * V})" if spec.dot_layout else f"(NB, {H}, {V})"
        bufs = [("qw", qw_shape, "uint8"), ("sc", f"(NB, NG, {V})", f32), ("st", "(2,)", "int32"), ("x", h1, f32)]
        scalars, sym = ["escale: T.float32"], ("NB", "NG")
    elif role == "attention":
        KV, half, qkv = spec.kv_heads, D // 2, f"({spec.qkv},)"
        bufs = [("qkv", f"(1, {spec.qkv})", f32), ("b", qkv, f32), ("m", qkv, f32),
                ("cs", f"(C, {KV}, {half})", f32), ("sn", f"(C, {KV}, {half})", f32),
                ("kc", f"(NL, {KV}, C, {D})", f32), ("vc", f"(NL, {KV}, C, {D})", f32),
                ("att", f"({spec.heads}, CA)", f32), ("st", "(2,)", "int32"), ("om", f"({spec.heads * D},)", f32),
                ("o", f"(1, {spec.heads * D})", f32)]
        bufs += [("qn", f"({D},)", f32), ("kn", f"({D},)", f32)] if spec.qk_norm else []
        scalars = ["layer: T.int64", "scale: T.float32", "win: T.int64"] + (["eps: T.float32"] if spec.qk_norm else [])
        sym = ("NL", "C", "CA")
    elif role == "glu":
        bufs, scalars, sym = [("gu", "(1, F2)", f32), ("b", "(NBIAS,)", f32), ("a", "(1, F)", f32)], [], ("F", "F2", "NBIAS")
    else:
        raise EdgeqError(f"no decoder function {role!r}")
    head = func_head(name, [f"{b}_h: T.handle" for b, _, _ in bufs] + scalars, sym)
    return head + "".join(f'    {b} = T.match_buffer({b}_h, {shape}, "{dt}")\n' for b, shape, dt in bufs)


def fast_exp(x: str) -> str:
    """``exp(x)`` as a TIR expression LLVM vectorizes (libm's ``expf`` is a scalar call per lane):
    Cephes' single-precision exp — ``x = n ln2 + r`` (``|r| <= ln2 / 2``, ln2 split in two), a
    degree-6 polynomial in ``r``, times ``2**n`` built in the exponent bits; within 2 ulp of
    ``expf`` on the clamped range [-87.3, 88.4] (below: ~1e-38 instead of 0). ``x`` is repeated:
    pass a load or a local, not an expensive expression."""
    c = f"T.max(T.min({x}, T.float32(88.3762626647949)), T.float32(-87.3365447504019))"
    n = f"T.floor({c} * T.float32(1.44269504088896341) + T.float32(0.5))"
    r = f"({c} - {n} * T.float32(0.693359375) + {n} * T.float32(2.12194440e-4))"
    p = "T.float32(1.9875691500e-4)"
    for k in ("1.3981999507e-3", "8.3334519073e-3", "4.1665795894e-2", "1.6666665459e-1", "5.0000001201e-1"):
        p = f"({p} * {r} + T.float32({k}))"
    two_n = f'T.reinterpret("float32", T.shift_left(T.Cast("int32", {n}) + T.int32(127), T.int32(23)))'
    return f"(({p} * {r} * {r} + {r} + T.float32(1)) * {two_n})"


def _tree(terms: list[str]) -> str:
    """A balanced sum (independent adds instead of one chain of dependent ones)."""
    while len(terms) > 1:
        terms = [f"({terms[i]} + {terms[i + 1]})" if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _hsum(buf: str) -> str:
    return _tree([f"{buf}[{i}]" for i in range(LANES)])


def _rms(spec: DecoderSpec, src: str) -> str:
    """``h = src * rsqrt(mean(src²) + eps) * w`` over the hidden width (``src`` a (1, H) buffer)."""
    H, L = spec.hidden, LANES
    return f"""    acc = T.decl_buffer(({L},), "float32")
    for j in T.vectorized({L}):
        acc[j] = T.float32(0)
    for i in range({H // L}):
        for j in T.vectorized({L}):
            acc[j] = acc[j] + {src}[0, i * {L} + j] * {src}[0, i * {L} + j]
    r = T.float32(1) / T.sqrt(({_hsum("acc")}) / T.float32({H}) + eps)
    for i in T.vectorized({H}):
        h[0, i] = {src}[0, i] * r * w[i]
"""


def _norm(name: str, spec: DecoderSpec) -> str:
    return signature("norm", name, spec) + _rms(spec, "x")


def _add_norm(name: str, spec: DecoderSpec) -> str:
    H = spec.hidden
    return signature("add_norm", name, spec) + f"""\
    for i in T.vectorized({H}):
        x[0, i] = x[0, i] + (y[0, i] + b[i])
""" + _rms(spec, "x")


def _post_add_norm(name: str, spec: DecoderSpec) -> str:
    H, L = spec.hidden, LANES
    return signature("post_add_norm", name, spec) + f"""\
    pacc = T.decl_buffer(({L},), "float32")
    for i in T.vectorized({H}):
        y[0, i] = y[0, i] + b[i]
    for j in T.vectorized({L}):
        pacc[j] = T.float32(0)
    for i in range({H // L}):
        for j in T.vectorized({L}):
            pacc[j] = pacc[j] + y[0, i * {L} + j] * y[0, i * {L} + j]
    pr = T.float32(1) / T.sqrt(({_hsum("pacc")}) / T.float32({H}) + eps)
    for i in T.vectorized({H}):
        x[0, i] = x[0, i] + y[0, i] * pr * pw[i]
""" + _rms(spec, "x")


def _embed(name: str, spec: DecoderSpec) -> str:
    """Row ``n`` of the blocked int8 table is lane ``n % block`` of block ``n // block``; float layout
    ``qw`` (NB, K, block), integer-dot layout (NB, K / 4, 4 * block) with lane j = bytes 4j .. 4j+3."""
    H, V = spec.hidden, spec.block
    code = "qw[nb, k // 4, lane * 4 + k % 4]" if spec.dot_layout else "qw[nb, k, lane]"
    return signature("embed", name, spec) + f"""\
    tok = T.Cast("int64", st[1])
    nb = tok // {V}
    lane = tok % {V}
    for k in range({H}):
        x[0, k] = (T.Cast("float32", {code}) - T.float32(128)) * sc[nb, k // ({H} // NG), lane] * escale
"""


def _head_rms(buf: str, wbuf: str, D: int) -> str:
    """QK-norm of one head held in ``buf`` (D,): ``buf *= rsqrt(mean(buf²) + eps) * w``."""
    L = LANES
    return f"""for j in T.vectorized({L}):
    hacc[j] = {_tree([f"{buf}[{d * L} + j] * {buf}[{d * L} + j]" for d in range(D // L)])}
hr = T.float32(1) / T.sqrt(({_hsum("hacc")}) / T.float32({D}) + eps)
for i in T.vectorized({D}):
    {buf}[i] = {buf}[i] * hr * {wbuf}[i]
"""


def _indent(src: str, n: int) -> str:
    return "".join(" " * n + ln + "\n" for ln in src.splitlines())


def _attention(name: str, spec: DecoderSpec) -> str:
    H, KV, D, L = spec.heads, spec.kv_heads, spec.head_dim, LANES
    half, grp = D // 2, H // KV
    KO, VO = H * D, (H + KV) * D  # offsets of K and V in the Q|K|V row
    qkn = spec.qk_norm

    def load(off: str) -> str:  # one head's D values with bias and the rate's mask
        return f"(qkv[0, {off} + i] + b[{off} + i]) * m[{off} + i]"

    def rope(src: str, dst: str, g: str) -> str:
        return f"""for i in range({half}):
    {dst.format(i="i")} = {src}[i] * cs[pos, {g}, i] - {src}[{half} + i] * sn[pos, {g}, i]
    {dst.format(i=f"{half} + i")} = {src}[{half} + i] * cs[pos, {g}, i] + {src}[i] * sn[pos, {g}, i]
"""

    k_norm = _indent(_head_rms("t", "kn", D), 8) if qkn else ""
    q_norm = _indent(_head_rms("t", "qn", D), 8) if qkn else ""
    return signature("attention", name, spec) + f"""\
    pos = T.Cast("int64", st[0])
    lo = T.Select(win > T.int64(0), T.max(pos - win + T.int64(1), T.int64(0)), T.int64(0))
    t = T.decl_buffer(({D},), "float32")
    q = T.decl_buffer(({D},), "float32")  # (not "local": a {D}-lane local vector spills, measured slower)
    oacc = T.decl_buffer(({D},), "float32")
    acc = T.decl_buffer(({L},), "float32")
    hacc = T.decl_buffer(({L},), "float32")
    mx = T.decl_buffer((1,), "float32")
    sm = T.decl_buffer((1,), "float32")
    for g in range({KV}):
        for i in range({D}):
            t[i] = {load(f"{KO} + g * {D}")}
{k_norm}{_indent(rope("t", "kc[layer, g, pos, {i}]", "g"), 8)}        for i in range({D}):
            vc[layer, g, pos, i] = {load(f"{VO} + g * {D}")}
    # one thread: a parallel launch over the heads saves ~1.5 us of ~13 (SmolLM2 at position
    # 160) on an idle machine but waits for a descheduled worker on a loaded one (docs/benchmarks.md)
    for hd in range({H}):
        for i in range({D}):
            t[i] = {load(f"hd * {D}")}
{q_norm}{_indent(rope("t", "q[{i}]", f"hd // {grp}"), 8)}        mx[0] = T.float32(-3.4028234663852886e38)
        for s in range(lo, pos + 1):
            for j in T.vectorized({L}):
                acc[j] = {_tree([f"q[{d * L} + j] * kc[layer, hd // {grp}, s, {d * L} + j]" for d in range(D // L)])}
            att[hd, s] = ({_hsum("acc")}) * scale
            mx[0] = T.max(mx[0], att[hd, s])
        for j in T.vectorized({L}):
            acc[j] = T.float32(0)
        for s in range(lo // {L}, (pos + {L}) // {L}):
            for j in T.vectorized({L}):
                att[hd, s * {L} + j] = T.Select(s * {L} + j >= lo and s * {L} + j <= pos,
                                                {fast_exp(f"(att[hd, s * {L} + j] - mx[0])")}, T.float32(0))
                acc[j] = acc[j] + att[hd, s * {L} + j]
        sm[0] = {_hsum("acc")}
        for i in T.vectorized({D}):
            oacc[i] = T.float32(0)
        for s in range(lo, pos + 1):
            for i in T.vectorized({D}):
                oacc[i] = oacc[i] + att[hd, s] * vc[layer, hd // {grp}, s, i]
        for i in T.vectorized({D}):
            o[0, hd * {D} + i] = oacc[i] / sm[0] * om[hd * {D} + i]
"""


def _glu(name: str, spec: DecoderSpec) -> str:
    """SwiGLU ``g / (1 + exp(-g)) * u`` or GeGLU ``0.5 g (1 + tanh(c (g + 0.044715 g³))) * u`` (the
    tanh as ``1 - 2 / (exp(2 z) + 1)``), ``g`` / ``u`` the gate / up halves of each block plus bias."""
    V = spec.block
    if spec.act == "silu":
        pre = f"T.float32(0) - (gu[0, nb * {2 * V} + j] + b[nb * {2 * V} + j])"  # -g
        act = f"(T.float32(0) - z[j]) / (T.float32(1) + {fast_exp('z[j]')})"
    else:  # z = 2 c (g + 0.044715 g³), g kept in gl
        c = "T.float32(0.7978845608028654)"
        pre = f"T.float32(2) * {c} * (gl[j] + T.float32(0.044715) * gl[j] * gl[j] * gl[j])"
        tanh = f"(T.float32(1) - T.float32(2) / ({fast_exp('z[j]')} + T.float32(1)))"
        act = f"T.float32(0.5) * gl[j] * (T.float32(1) + {tanh})"
    keep = "" if spec.act == "silu" else f"""        for j in T.vectorized({V}):
            gl[j] = gu[0, nb * {2 * V} + j] + b[nb * {2 * V} + j]
"""
    return signature("glu", name, spec) + f"""\
    z = T.decl_buffer(({V},), "float32")
    gl = T.decl_buffer(({V},), "float32")
    for nb in range(F // {V}):
{keep}        for j in T.vectorized({V}):
            z[j] = {pre}
        for j in T.vectorized({V}):
            a[0, nb * {V} + j] = {act} * (gu[0, nb * {2 * V} + {V} + j] + b[nb * {2 * V} + {V} + j])
"""

"""TIR (TVMScript) of the decoder around the matmul kernels, for one decode token (CPU targets).

The per-token path of a Llama / Qwen2 layer between the generated matmul kernels
(:mod:`tir_cpu`, :mod:`tir_dot`), as a few functions compiled into the same library:

* ``embed``    — the token's row of the int8 embedding table, read from the head kernel's blocked
  layout (float or integer-dot ``qw``), dequantized into ``x``;
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
* ``swiglu``   — ``silu(gate + b) * (up + b)`` over the interleaved gate|up blocks of the
  gate|up kernel's output.

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

LANES = 8  # partial sums of the norms' and the attention scores' reductions


@dataclass(frozen=True)
class DecoderSpec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    block: int  # the kernels' output block (gate|up interleaved by blocks of this many channels)
    dot_layout: bool = False  # the embedding table in the integer-dot layout (int8-activation kernels)

    def __post_init__(self):
        if self.hidden % LANES or self.head_dim % LANES:
            raise EdgeqError(f"decoder widths must be multiples of {LANES}: hidden {self.hidden}, "
                             f"head_dim {self.head_dim}")
        if self.heads % self.kv_heads:
            raise EdgeqError(f"{self.heads} heads are not a multiple of {self.kv_heads} KV heads")

    @property
    def qkv(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def names(self) -> dict[str, str]:
        """role -> function name (the spec's constants in the name: one library may hold several)."""
        h, d = self.hidden, self.head_dim
        return {"embed": f"dec_embed_h{h}_b{self.block}{'_q8' if self.dot_layout else ''}",
                "norm": f"dec_norm_h{h}",
                "add_norm": f"dec_add_norm_h{h}",
                "attention": f"dec_attention_h{self.heads}_kv{self.kv_heads}_d{d}",
                "swiglu": f"dec_swiglu_b{self.block}"}

    def sources(self) -> dict[str, str]:
        """function name -> TVMScript source."""
        n = self.names()
        return {n["embed"]: _embed(n["embed"], self), n["norm"]: _norm(n["norm"], self),
                n["add_norm"]: _add_norm(n["add_norm"], self), n["attention"]: _attention(n["attention"], self),
                n["swiglu"]: _swiglu(n["swiglu"], self)}


def _head(name: str, args: list[str], sym: tuple[str, ...] = ()) -> str:
    lines = [f"@T.prim_func\ndef {name}({', '.join(args)}):",
             f"    T.func_attr({{\"global_symbol\": \"{name}\", \"tir.noalias\": True}})"]
    lines += [f"    {v} = T.int64()" for v in sym]
    return "\n".join(lines) + "\n"


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
    return f"""    acc = T.decl_buffer(({L},), "float32", scope="local")
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
    H = spec.hidden
    return _head(name, ["x_h: T.handle", "w_h: T.handle", "h_h: T.handle", "eps: T.float32"]) + f"""\
    x = T.match_buffer(x_h, (1, {H}), "float32")
    w = T.match_buffer(w_h, ({H},), "float32")
    h = T.match_buffer(h_h, (1, {H}), "float32")
""" + _rms(spec, "x")


def _add_norm(name: str, spec: DecoderSpec) -> str:
    H = spec.hidden
    return _head(name, ["x_h: T.handle", "y_h: T.handle", "b_h: T.handle", "w_h: T.handle", "h_h: T.handle",
                        "eps: T.float32"]) + f"""\
    x = T.match_buffer(x_h, (1, {H}), "float32")
    y = T.match_buffer(y_h, (1, {H}), "float32")
    b = T.match_buffer(b_h, ({H},), "float32")
    w = T.match_buffer(w_h, ({H},), "float32")
    h = T.match_buffer(h_h, (1, {H}), "float32")
    for i in T.vectorized({H}):
        x[0, i] = x[0, i] + (y[0, i] + b[i])
""" + _rms(spec, "x")


def _embed(name: str, spec: DecoderSpec) -> str:
    """Row ``n`` of the blocked int8 table is lane ``n % block`` of block ``n // block``; float layout
    ``qw`` (NB, K, block), integer-dot layout (NB, K / 4, 4 * block) with lane j = bytes 4j .. 4j+3."""
    H, V = spec.hidden, spec.block
    qw_shape, code = ((f"(NB, {H // 4}, {4 * V})", "qw[nb, k // 4, lane * 4 + k % 4]") if spec.dot_layout
                      else (f"(NB, {H}, {V})", "qw[nb, k, lane]"))
    return _head(name, ["qw_h: T.handle", "sc_h: T.handle", "st_h: T.handle", "x_h: T.handle"],
                 ("NB", "NG")) + f"""\
    qw = T.match_buffer(qw_h, {qw_shape}, "uint8")
    sc = T.match_buffer(sc_h, (NB, NG, {V}), "float32")
    st = T.match_buffer(st_h, (2,), "int32")
    x = T.match_buffer(x_h, (1, {H}), "float32")
    tok = T.Cast("int64", st[1])
    nb = tok // {V}
    lane = tok % {V}
    for k in range({H}):
        x[0, k] = (T.Cast("float32", {code}) - T.float32(128)) * sc[nb, k // ({H} // NG), lane]
"""


def _attention(name: str, spec: DecoderSpec) -> str:
    H, KV, D, L = spec.heads, spec.kv_heads, spec.head_dim, LANES
    half, grp, QKV = D // 2, H // KV, spec.qkv
    KO, VO = H * D, (H + KV) * D  # offsets of K and V in the Q|K|V row

    def qk(off: str, i: str) -> str:  # one Q|K|V element with its bias and the rate's mask
        return f"(qkv[0, {off} + {i}] + b[{off} + {i}]) * m[{off} + {i}]"

    return _head(name, ["qkv_h: T.handle", "b_h: T.handle", "m_h: T.handle", "cs_h: T.handle", "sn_h: T.handle", "kc_h: T.handle",
                        "vc_h: T.handle", "att_h: T.handle", "st_h: T.handle", "om_h: T.handle", "o_h: T.handle",
                        "layer: T.int64", "scale: T.float32"], ("NL", "C", "CA")) + f"""\
    qkv = T.match_buffer(qkv_h, (1, {QKV}), "float32")
    b = T.match_buffer(b_h, ({QKV},), "float32")
    m = T.match_buffer(m_h, ({QKV},), "float32")
    cs = T.match_buffer(cs_h, (C, {KV}, {half}), "float32")
    sn = T.match_buffer(sn_h, (C, {KV}, {half}), "float32")
    kc = T.match_buffer(kc_h, (NL, {KV}, C, {D}), "float32")
    vc = T.match_buffer(vc_h, (NL, {KV}, C, {D}), "float32")
    att = T.match_buffer(att_h, ({H}, CA), "float32")
    st = T.match_buffer(st_h, (2,), "int32")
    om = T.match_buffer(om_h, ({H * D},), "float32")
    o = T.match_buffer(o_h, (1, {H * D}), "float32")
    pos = T.Cast("int64", st[0])
    for g in range({KV}):
        for i in range({half}):
            kc[layer, g, pos, i] = {qk(f"{KO} + g * {D}", "i")} * cs[pos, g, i] - {qk(f"{KO} + g * {D} + {half}", "i")} * sn[pos, g, i]
            kc[layer, g, pos, {half} + i] = {qk(f"{KO} + g * {D} + {half}", "i")} * cs[pos, g, i] + {qk(f"{KO} + g * {D}", "i")} * sn[pos, g, i]
        for i in range({D}):
            vc[layer, g, pos, i] = {qk(f"{VO} + g * {D}", "i")}
    # one thread: a parallel launch over the heads saves ~1.5 us of ~13 (SmolLM2 at position
    # 160) on an idle machine but waits for a descheduled worker on a loaded one (docs/benchmarks.md)
    for hd in range({H}):
        q = T.decl_buffer(({D},), "float32")  # (not "local": a {D}-lane local vector spills, measured slower)
        acc = T.decl_buffer(({L},), "float32", scope="local")
        oacc = T.decl_buffer(({D},), "float32")
        mx = T.decl_buffer((1,), "float32", scope="local")
        sm = T.decl_buffer((1,), "float32", scope="local")
        for i in range({half}):
            q[i] = {qk(f"hd * {D}", "i")} * cs[pos, hd // {grp}, i] - {qk(f"hd * {D} + {half}", "i")} * sn[pos, hd // {grp}, i]
            q[{half} + i] = {qk(f"hd * {D} + {half}", "i")} * cs[pos, hd // {grp}, i] + {qk(f"hd * {D}", "i")} * sn[pos, hd // {grp}, i]
        mx[0] = T.float32(-3.4028234663852886e38)
        for s in range(pos + 1):
            for j in T.vectorized({L}):
                acc[j] = {_tree([f"q[{d * L} + j] * kc[layer, hd // {grp}, s, {d * L} + j]" for d in range(D // L)])}
            att[hd, s] = ({_hsum("acc")}) * scale
            mx[0] = T.max(mx[0], att[hd, s])
        for j in T.vectorized({L}):
            acc[j] = T.float32(0)
        for s in range((pos + {L}) // {L}):
            for j in T.vectorized({L}):
                att[hd, s * {L} + j] = T.Select(s * {L} + j <= pos, {fast_exp(f"(att[hd, s * {L} + j] - mx[0])")}, T.float32(0))
                acc[j] = acc[j] + att[hd, s * {L} + j]
        sm[0] = {_hsum("acc")}
        for i in T.vectorized({D}):
            oacc[i] = T.float32(0)
        for s in range(pos + 1):
            for i in T.vectorized({D}):
                oacc[i] = oacc[i] + att[hd, s] * vc[layer, hd // {grp}, s, i]
        for i in T.vectorized({D}):
            o[0, hd * {D} + i] = oacc[i] / sm[0] * om[hd * {D} + i]
"""


def _swiglu(name: str, spec: DecoderSpec) -> str:
    V = spec.block
    return _head(name, ["gu_h: T.handle", "b_h: T.handle", "a_h: T.handle"], ("F", "F2", "NBIAS")) + f"""\
    gu = T.match_buffer(gu_h, (1, F2), "float32")
    b = T.match_buffer(b_h, (NBIAS,), "float32")
    a = T.match_buffer(a_h, (1, F), "float32")
    g = T.decl_buffer(({V},), "float32", scope="local")
    for nb in range(F // {V}):
        for j in T.vectorized({V}):
            g[j] = T.float32(0) - (gu[0, nb * {2 * V} + j] + b[nb * {2 * V} + j])
        for j in T.vectorized({V}):
            a[0, nb * {V} + j] = (T.float32(0) - g[j]) / (T.float32(1) + {fast_exp("g[j]")}) * (
                gu[0, nb * {2 * V} + {V} + j] + b[nb * {2 * V} + {V} + j])
"""

"""TIR (TVMScript) of the decode-token decoder for CUDA targets (T4 sm_75, RTX 3060 sm_86, RTX 4090
laptop sm_89): the functions of :mod:`edgeq.kernels.tir_decoder` — same names, same arguments, same
formulas — written as GPU kernels, so a CUDA library carries the whole decode token next to its
matmul kernels (:mod:`edgeq.kernels.tir_cuda`).

Kernels (every buffer is device memory; the host never reads one — the position and the token id
are read from ``state`` inside the kernels):

* ``norm`` / ``add_norm`` / ``post_add_norm`` — one block of ``NT`` threads; each thread owns the
  hidden positions ``i ≡ tx (mod NT)`` (the residual add writes only its own positions), the sum of
  squares is reduced in two shared-memory levels (``NT`` partials, then ``NT2``) and every thread
  sums the last ``NT2`` itself in one fixed order (deterministic: no atomics);
* ``embed`` — a thread per hidden position;
* ``glu`` — a block per output block of ``block`` channels (symbolic count: the rate's width), a
  thread per channel;
* ``attention`` — two launches: one block per KV head stores K (QK-norm, RoPE) and V at ``pos``
  (a thread per RoPE pair); then one block of ``HT`` threads per query head: its Q (bias, masks,
  QK-norm, RoPE) into shared memory, the scores of positions ``lo .. pos`` (a thread per
  position, strided), max and sum reduced through shared memory, ``exp`` in place in the ``att``
  scratch row, then the weighted sum of V (a thread per head dim).

Phases that exchange data through memory are separate thread loops with a barrier
(``__syncthreads``) between them. With ``emulate=True`` the same source is generated with the
thread loops serial, no barriers and global scratch, for an LLVM CPU target: phase by phase that
is exactly the barrier semantics, so the kernels' arithmetic and indexing are checked on a CPU
against the CPU decoder (tests/kernels/test_tir_decoder_cuda.py); the CUDA form itself is compiled
with TVM and checked with ``nvcc`` for each profile's architecture.
"""
from __future__ import annotations

from edgeq.kernels.tir_decoder import DecoderSpec, signature

NT = 256  # threads of the norm kernels' one block
NT2 = 32  # second level of their sum (NT / NT2 partials each)
HT = 128  # threads of a query head's attention block
EMBED_T = 256  # threads per block of the embedding row


class _Form:
    """How a thread loop, a barrier and a scratch buffer are written: CUDA, or serial emulation."""

    def __init__(self, emulate: bool):
        self.emulate = emulate
        self.shared = '"global"' if emulate else '"shared"'
        self.local = '"global"' if emulate else '"local"'

    def loop(self, n, tag: str) -> str:
        return f"T.serial({n})" if self.emulate else f'T.thread_binding({n}, thread="{tag}")'

    def sync(self, indent: int) -> str:
        return "" if self.emulate else " " * indent + 'T.tvm_storage_sync("shared")\n'


def _tree(terms: list[str], op: str = "+") -> str:
    """A balanced reduction in a fixed order (``op``: ``+`` or ``max``)."""
    while len(terms) > 1:
        nxt = []
        for i in range(0, len(terms), 2):
            if i + 1 == len(terms):
                nxt.append(terms[i])
            elif op == "+":
                nxt.append(f"({terms[i]} + {terms[i + 1]})")
            else:
                nxt.append(f"T.max({terms[i]}, {terms[i + 1]})")
        terms = nxt
    return terms[0]


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _strided(n: int, body: str, indent: int, idx: str = "idx") -> str:
    """``for`` over this thread's positions ``idx = i * NT + tx < n`` with ``body`` (lines using idx)."""
    pad = " " * indent
    guard = n % NT != 0
    out = f"{pad}for i in range({_ceil(n, NT)}):\n{pad}    {idx} = i * {NT} + tx\n"
    inner = pad + ("        " if guard else "    ")
    if guard:
        out += f"{pad}    if {idx} < {n}:\n"
    return out + "".join(inner + ln + "\n" for ln in body.splitlines())


def _sum_phases(f: _Form, H: int, first: str, value: str, red: str) -> str:
    """Phases 1-2 of a block sum: ``first`` (lines at each position ``idx``), then the partial sum of
    ``value`` (an expression of ``idx``) into shared ``red`` (NT) and ``red2`` (NT2); a later phase
    reads the total as :func:`_total`."""
    per = NT // NT2
    part = "part" + red
    body = (first + "\n" if first else "") + f"{part}[0] = {part}[0] + {value}"
    return f"""        for tx in {f.loop(NT, "threadIdx.x")}:
            {part} = T.decl_buffer((1,), "float32", scope={f.local})
            {part}[0] = T.float32(0)
{_strided(H, body, 12)}            {red}[tx] = {part}[0]
{f.sync(8)}        for tx in {f.loop(NT, "threadIdx.x")}:
            if tx < {NT2}:
                {red}2[tx] = {_tree([f"{red}[tx * {per} + {k}]" for k in range(per)])}
{f.sync(8)}"""


def _total(red: str) -> str:
    return _tree([f"{red}2[{k}]" for k in range(NT2)])


def _shared(f: _Form, red: str) -> str:
    return (f"        {red} = T.decl_buffer(({NT},), \"float32\", scope={f.shared})\n"
            f"        {red}2 = T.decl_buffer(({NT2},), \"float32\", scope={f.shared})\n")


def _norm_tail(f: _Form, H: int, red: str) -> str:
    """Last phase: ``h = x * rsqrt(total / H + eps) * w``."""
    return f"""        for tx in {f.loop(NT, "threadIdx.x")}:
            r = T.float32(1) / T.sqrt(({_total(red)}) / T.float32({H}) + eps)
{_strided(H, "h[0, idx] = x[0, idx] * r * w[idx]", 12)}"""


def _one_block(f: _Form) -> str:
    return f"    for bx in {f.loop(1, 'blockIdx.x')}:\n"


def _norm(name: str, spec: DecoderSpec, f: _Form) -> str:
    H = spec.hidden
    return signature("norm", name, spec) + _one_block(f) + _shared(f, "ra") \
        + _sum_phases(f, H, "", "x[0, idx] * x[0, idx]", "ra") + _norm_tail(f, H, "ra")


def _add_norm(name: str, spec: DecoderSpec, f: _Form) -> str:
    H = spec.hidden
    return signature("add_norm", name, spec) + _one_block(f) + _shared(f, "ra") \
        + _sum_phases(f, H, "x[0, idx] = x[0, idx] + (y[0, idx] + b[idx])", "x[0, idx] * x[0, idx]", "ra") \
        + _norm_tail(f, H, "ra")


def _post_add_norm(name: str, spec: DecoderSpec, f: _Form) -> str:
    H = spec.hidden
    add = f"""        for tx in {f.loop(NT, "threadIdx.x")}:
            pr = T.float32(1) / T.sqrt(({_total("rp")}) / T.float32({H}) + eps)
"""
    return signature("post_add_norm", name, spec) + _one_block(f) + _shared(f, "rp") + _shared(f, "ra") \
        + _sum_phases(f, H, "y[0, idx] = y[0, idx] + b[idx]", "y[0, idx] * y[0, idx]", "rp") \
        + add + _post_phase(f, H) + _norm_tail(f, H, "ra")


def _post_phase(f: _Form, H: int) -> str:
    """Within the thread loop opened by the caller: ``x += y * pr * pw`` and the sum of ``x²``."""
    per = NT // NT2
    body = "x[0, idx] = x[0, idx] + y[0, idx] * pr * pw[idx]\npartra[0] = partra[0] + x[0, idx] * x[0, idx]"
    return f"""            partra = T.decl_buffer((1,), "float32", scope={f.local})
            partra[0] = T.float32(0)
{_strided(H, body, 12)}            ra[tx] = partra[0]
{f.sync(8)}        for tx in {f.loop(NT, "threadIdx.x")}:
            if tx < {NT2}:
                ra2[tx] = {_tree([f"ra[tx * {per} + {k}]" for k in range(per)])}
{f.sync(8)}"""


def _embed(name: str, spec: DecoderSpec, f: _Form) -> str:
    H, V = spec.hidden, spec.block
    code = "qw[nb, k // 4, lane * 4 + k % 4]" if spec.dot_layout else "qw[nb, k, lane]"
    guard = H % EMBED_T != 0
    store = f"x[0, k] = (T.Cast(\"float32\", {code}) - T.float32(128)) * sc[nb, k // ({H} // NG), lane] * escale"
    body = (f"            if k < {H}:\n                {store}\n" if guard else f"            {store}\n")
    return signature("embed", name, spec) + f"""\
    for bx in {f.loop(_ceil(H, EMBED_T), "blockIdx.x")}:
        for tx in {f.loop(EMBED_T, "threadIdx.x")}:
            tok = T.Cast("int64", st[1])
            nb = tok // {V}
            lane = tok % {V}
            k = bx * {EMBED_T} + tx
{body}"""


def _glu(name: str, spec: DecoderSpec, f: _Form) -> str:
    V = spec.block
    g = f"(gu[0, nb * {2 * V} + j] + b[nb * {2 * V} + j])"
    u = f"(gu[0, nb * {2 * V} + {V} + j] + b[nb * {2 * V} + {V} + j])"
    if spec.act == "silu":
        act = "g / (T.float32(1) + T.exp(T.float32(0) - g))"
    else:
        act = ("T.float32(0.5) * g * (T.float32(1) + T.tanh(T.float32(0.7978845608028654) * "
               "(g + T.float32(0.044715) * g * g * g)))")
    return signature("glu", name, spec) + f"""\
    for nb in {f.loop(f"F // {V}", "blockIdx.x")}:
        for j in {f.loop(V, "threadIdx.x")}:
            g = {g}
            a[0, nb * {V} + j] = {act} * {u}
"""


def _attention(name: str, spec: DecoderSpec, f: _Form) -> str:
    H, KV, D = spec.heads, spec.kv_heads, spec.head_dim
    half, grp = D // 2, H // KV
    KO, VO = H * D, (H + KV) * D
    qkn = spec.qk_norm

    def load(off: str) -> str:
        return f"((qkv[0, {off}] + b[{off}]) * m[{off}])"

    where = """            pos = T.Cast("int64", st[0])
            lo = T.Select(win > T.int64(0), T.max(pos - win + T.int64(1), T.int64(0)), T.int64(0))
"""
    # ---- launch 1: K (QK-norm, RoPE) and V of each KV head into the cache at pos; a thread per pair
    k0, k1 = load(f"{KO} + g * {D} + i"), load(f"{KO} + g * {D} + {half} + i")
    v_store = f"""            vc[layer, g, pos, i] = {load(f"{VO} + g * {D} + i")}
            vc[layer, g, pos, {half} + i] = {load(f"{VO} + g * {D} + {half} + i")}
"""
    rope_k = f"""            kc[layer, g, pos, i] = k0 * cs[pos, g, i] - k1 * sn[pos, g, i]
            kc[layer, g, pos, {half} + i] = k1 * cs[pos, g, i] + k0 * sn[pos, g, i]
"""
    if qkn:
        kv = f"""    for g in {f.loop(KV, "blockIdx.x")}:
        rk = T.decl_buffer(({half},), "float32", scope={f.shared})
        for i in {f.loop(half, "threadIdx.x")}:
            rk[i] = {k0} * {k0} + {k1} * {k1}
{f.sync(8)}        for i in {f.loop(half, "threadIdx.x")}:
            pos = T.Cast("int64", st[0])
            hr = T.float32(1) / T.sqrt(({_tree([f"rk[{p}]" for p in range(half)])}) / T.float32({D}) + eps)
            k0 = {k0} * hr * kn[i]
            k1 = {k1} * hr * kn[{half} + i]
{rope_k}{v_store}"""
    else:
        kv = f"""    for g in {f.loop(KV, "blockIdx.x")}:
        for i in {f.loop(half, "threadIdx.x")}:
            pos = T.Cast("int64", st[0])
            k0 = {k0}
            k1 = {k1}
{rope_k}{v_store}"""

    # ---- launch 2: a block per query head
    pairs = _ceil(half, HT)
    pguard = half % HT != 0

    def per_pair(body: str) -> str:  # lines at this thread's pairs p = i * HT + tx < half
        pad = " " * (16 if pguard else 12)
        out = f"            for i in range({pairs}):\n                p = i * {HT} + tx\n"
        if pguard:
            out += f"                if p < {half}:\n"
        return out + "".join(pad + "    " + ln + "\n" for ln in body.splitlines())

    q_load = f"qr[p] = {load(f'hd * {D} + p')}\nqr[{half} + p] = {load(f'hd * {D} + {half} + p')}"
    if qkn:
        q_load += f"\npq[0] = pq[0] + qr[p] * qr[p] + qr[{half} + p] * qr[{half} + p]"
    phase_q = f"""        for tx in {f.loop(HT, "threadIdx.x")}:
            pq = T.decl_buffer((1,), "float32", scope={f.local})
            pq[0] = T.float32(0)
{per_pair(q_load)}            rq[tx] = pq[0]
{f.sync(8)}"""
    if qkn:
        scale_q = (f"hr = T.float32(1) / T.sqrt(({_tree([f'rq[{t}]' for t in range(HT)])}) / T.float32({D}) + eps)\n")
        a0, a1 = f"qr[p] * hr * qn[p]", f"qr[{half} + p] * hr * qn[{half} + p]"
    else:
        scale_q, a0, a1 = "", "qr[p]", f"qr[{half} + p]"
    rope_q = (f"q[p] = {a0} * cs[pos, hd // {grp}, p] - {a1} * sn[pos, hd // {grp}, p]\n"
              f"q[{half} + p] = {a1} * cs[pos, hd // {grp}, p] + {a0} * sn[pos, hd // {grp}, p]")
    phase_rope = f"""        for tx in {f.loop(HT, "threadIdx.x")}:
            pos = T.Cast("int64", st[0])
{("            " + scale_q) if qkn else ""}{per_pair(rope_q)}{f.sync(8)}"""
    steps = f"(pos - lo + T.int64({HT})) // T.int64({HT})"
    score = f"""                    dacc = T.decl_buffer((1,), "float32", scope={f.local})
                    dacc[0] = T.float32(0)
                    for d in range({D}):
                        dacc[0] = dacc[0] + q[d] * kc[layer, hd // {grp}, s, d]
                    att[hd, s] = dacc[0] * scale
"""
    phase_scores = f"""        for tx in {f.loop(HT, "threadIdx.x")}:
{where}            pm = T.decl_buffer((1,), "float32", scope={f.local})
            pm[0] = T.float32(-3.4028234663852886e38)
            for j in range({steps}):
                s = lo + j * {HT} + tx
                if s <= pos:
{score}                    pm[0] = T.max(pm[0], att[hd, s])
            rm[tx] = pm[0]
{f.sync(8)}"""
    phase_exp = f"""        for tx in {f.loop(HT, "threadIdx.x")}:
{where}            mx = {_tree([f"rm[{t}]" for t in range(HT)], "max")}
            ps = T.decl_buffer((1,), "float32", scope={f.local})
            ps[0] = T.float32(0)
            for j in range({steps}):
                s = lo + j * {HT} + tx
                if s <= pos:
                    att[hd, s] = T.exp(att[hd, s] - mx)
                    ps[0] = ps[0] + att[hd, s]
            rs[tx] = ps[0]
{f.sync(8)}"""
    dims = _ceil(D, HT)
    dguard = D % HT != 0
    out_body = f"""oa = T.decl_buffer((1,), "float32", scope={f.local})
oa[0] = T.float32(0)
for s in range(lo, pos + 1):
    oa[0] = oa[0] + att[hd, s] * vc[layer, hd // {grp}, s, d]
o[0, hd * {D} + d] = oa[0] / sm * om[hd * {D} + d]"""
    pad = " " * (20 if dguard else 16)
    phase_out = f"""        for tx in {f.loop(HT, "threadIdx.x")}:
{where}            sm = {_tree([f"rs[{t}]" for t in range(HT)])}
            for i in range({dims}):
                d = i * {HT} + tx
{f"                if d < {D}:" + chr(10) if dguard else ""}{"".join(pad + ln + chr(10) for ln in out_body.splitlines())}"""
    heads = f"""    for hd in {f.loop(H, "blockIdx.x")}:
        qr = T.decl_buffer(({D},), "float32", scope={f.shared})
        q = T.decl_buffer(({D},), "float32", scope={f.shared})
        rq = T.decl_buffer(({HT},), "float32", scope={f.shared})
        rm = T.decl_buffer(({HT},), "float32", scope={f.shared})
        rs = T.decl_buffer(({HT},), "float32", scope={f.shared})
""" + phase_q + phase_rope + phase_scores + phase_exp + phase_out

    return signature("attention", name, spec) + kv + heads


_MAKE = {"embed": _embed, "norm": _norm, "add_norm": _add_norm, "attention": _attention, "glu": _glu,
         "post_add_norm": _post_add_norm}


def sources(spec: DecoderSpec, emulate: bool = False) -> dict[str, str]:
    """function name -> TVMScript source of the CUDA form (``emulate``: serial, for a CPU check)."""
    f = _Form(emulate)
    return {name: _MAKE[role](name, spec, f) for role, name in spec.names().items()}

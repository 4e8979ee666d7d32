"""TIR (TVMScript) of the int8-activation CPU kernels: integer dot products (spec ``act="int8"``).

Per call, the activations are quantized to int8 per weight group (one float32 scale
``dx = amax / 127`` per row and group, :mod:`edgeq.kernels.act_quant` is the bit-exact oracle), then
per output block of ``spec.block`` lanes and group the codes are accumulated in int32 with the
target's dot instruction — each 32-bit lane sums 4 byte products per instruction:

* ``avx512vnni`` — ``vpdpbusd`` zmm (16 lanes; ``llvm.x86.avx512.vpdpbusd.512``): unsigned weight
  codes × signed activations, so the raw codes (0..15 / 0..255) go in as they are;
* ``avxvnni`` — the same on ymm (8 lanes, ``.256``; VEX-encoded ``{vex} vpdpbusd`` without AVX-512);
* ``sdot`` — aarch64 dotprod ``sdot`` (4 lanes; ``llvm.aarch64.neon.sdot``): signed × signed, so
  8-bit codes enter as ``q − 128`` (one ``eor``), 4-bit nibbles (0..15) as they are;
* ``avx2`` — no dot instruction: ``vpmaddubsw`` (unsigned × signed bytes, adjacent pairs summed to
  int16, saturating) then ``vpmaddwd`` with ones (adjacent int16 pairs to int32): the same 4 byte
  products per 32-bit lane on ymm (8 lanes), as llama.cpp's AVX2 Q4_0 × Q8_0 dot does. 4-bit
  nibbles × int8 stay below the int16 bound even summed over 8 instructions (8 · 2 · 15 · 127 =
  30,480 < 32,767), so up to 8 ``vpmaddubsw`` results are added as int16 before one ``vpmaddwd``.
  8-bit codes enter as ``w = q − 128`` with the sign moved onto the activations
  (``|w|`` × ``sign(x, w)``, ``vpsignb``): 2 · 128 · 127 = 32,512 does not saturate.

After each group: ``acc += (Σ xq·(q − off) + (off − z)·Σ xq) · s · dx`` in float32 (``off`` the
offset the instruction needed: 128 for 8-bit codes under ``sdot``, else 0). The low-rank branch
stays float (``t = x · Aᵀ`` on the unquantized ``x``). The same function serves decode and
prefill (rows of ``x`` loop inside an output block, whose weights stay in cache).
"""
from __future__ import annotations

from edgeq.errors import EdgeqError
from edgeq.kernels.spec import KernelSpec
from edgeq.kernels.tir_cpu import f32_expr, low_rank_t, signature

# isa -> (int32 lanes per instruction, LLVM intrinsic)
DOT = {
    "avx512vnni": (16, "llvm.x86.avx512.vpdpbusd.512"),
    "avxvnni": (8, "llvm.x86.avx512.vpdpbusd.256"),
    "sdot": (4, "llvm.aarch64.neon.sdot.v4i32.v16i8"),
    "avx2": (8, None),  # vpmaddubsw + vpmaddwd (below)
}
PMADDUBSW, PMADDWD, PSIGNB = "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd", "llvm.x86.avx2.psign.b"
INT16_TERMS = 8  # 4-bit x int8 vpmaddubsw results summed in int16 before widening (bound above)
QMAX = 127
LANES = 8  # vector width of the quantization prologue's max / sum


def _hsum(buf: str, op: str, n: int) -> str:
    e = f"{buf}[0]"
    for i in range(1, n):
        e = f"{op}({e}, {buf}[{i}])" if op != "+" else f"{e} + {buf}[{i}]"
    return e


def _quantize(spec: KernelSpec) -> str:
    G, L = spec.group, LANES
    return f"""    xq = T.decl_buffer((M, K), "int8")
    xd = T.decl_buffer((M, K // {G}), "float32")
    xs = T.decl_buffer((M, K // {G}), "float32")
    mx = T.decl_buffer(({L},), "float32")
    sm = T.decl_buffer(({L},), "int32")
    for m in range(M):
        for g in range(K // {G}):
            for l in T.vectorized({L}):
                mx[l] = T.float32(0)
            for kk in range({G // L}):
                for l in T.vectorized({L}):
                    mx[l] = T.max(mx[l], T.fabs(x[m, g * {G} + kk * {L} + l]))
            amax = {_hsum("mx", "T.max", L)}
            inv = T.Select(amax > T.float32(0), T.float32({QMAX}) / amax, T.float32(0))
            for kk in T.vectorized({G}):
                xq[m, g * {G} + kk] = T.Cast("int8", T.nearbyint(x[m, g * {G} + kk] * inv))
            xd[m, g] = amax / T.float32({QMAX})
            for l in T.vectorized({L}):
                sm[l] = 0
            for kk in range({G // L}):
                for l in T.vectorized({L}):
                    sm[l] = sm[l] + T.Cast("int32", xq[m, g * {G} + kk * {L} + l])
            xs[m, g] = T.Cast("float32", {_hsum("sm", "+", L)})
"""


def _avx2_chain(pairs: list[tuple[str, str]], bits: int, lanes: int) -> str:
    """int32x8 sum of the byte products of ``pairs`` ((uint8x32 weights, int8x32 activations)
    expressions) with AVX2's ``vpmaddubsw`` + ``vpmaddwd``: 4-bit codes summed in int16 over up to
    :data:`INT16_TERMS` instructions first; 8-bit codes as ``|q − 128|`` × ``sign(x, q − 128)``."""
    b, h = 4 * lanes, 2 * lanes  # bytes per operand, int16 lanes (2 per int32 lane)
    ones = f"T.broadcast(T.int16(1), {h})"

    def madd(w: str, x: str) -> str:
        if bits == 8:
            ws = f'T.reinterpret("int8x{b}", T.bitwise_xor({w}, T.broadcast(T.uint8(128), {b})))'
            w = f'T.reinterpret("uint8x{b}", T.call_llvm_pure_intrin("int8x{b}", "{PSIGNB}", {ws}, {ws}))'
            x = f'T.call_llvm_pure_intrin("int8x{b}", "{PSIGNB}", {x}, {ws})'
        return f'T.call_llvm_pure_intrin("int16x{h}", "{PMADDUBSW}", {w}, {x})'

    per = INT16_TERMS if bits == 4 else 1
    out = []
    for i in range(0, len(pairs), per):
        s16 = " + ".join(madd(w, x) for w, x in pairs[i:i + per])
        out.append(f'T.call_llvm_pure_intrin("int32x{lanes}", "{PMADDWD}", {s16}, {ones})')
    return " + ".join(out) if out else f"T.broadcast(T.int32(0), {lanes})"


def source(spec: KernelSpec, isa: str) -> str:
    if isa not in DOT:
        raise EdgeqError(f"no integer dot instruction {isa!r} (one of {', '.join(DOT)})")
    if spec.act != "int8":
        raise EdgeqError(f"{spec.name}: not an int8-activation kernel")
    L, intrin = DOT[isa]
    V, G = spec.block, spec.group
    if V % L:
        raise EdgeqError(f"kernel block {V} is not a multiple of the {isa} width {L}")
    W = G * spec.bits // 32  # 32-bit words per lane and group
    B = 4 * L  # bytes per instruction operand
    signed = isa == "sdot"
    off = 128 if isa in ("sdot", "avx2") and spec.bits == 8 else 0

    def x_word(k: str) -> str:
        return f'T.reinterpret("int8x{B}", T.broadcast(T.reinterpret("int32", xq[m, T.ramp({k}, 1, 4)]), {L}))'

    def weights(e: str) -> str:
        if not signed:
            return e
        if off:
            e = f"T.bitwise_xor({e}, T.broadcast(T.uint8(128), {B}))"
        return f'T.reinterpret("int8x{B}", {e})'

    # One expression per lane chunk ``jj`` and group: two independent chains of dot instructions
    # (4-bit: low / high nibbles; 8-bit: even / odd words) hide their latency. Neither a local
    # buffer nor let-bound vectors: TVM 0.27 gives both memory that LLVM cannot tell from ``xq``'s
    # (measured: a store and a reload around every instruction, 2x slower).
    ind = " " * 16
    lines = []
    for jj in range(V // L):
        chains = {0: f"T.broadcast(T.int32(0), {L})", 1: f"T.broadcast(T.int32(0), {L})"}
        pairs = {0: [], 1: []}
        for c in range(W):
            w = f"qw[nb, g * {W} + {c}, T.ramp({jj * B}, 1, {B})]"
            if spec.bits == 8:
                parts = [(c % 2, w, f"g * {G} + {c * 4}")]
            else:
                parts = [(0, f"T.bitwise_and({w}, T.broadcast(T.uint8(15), {B}))", f"g * {G} + {c * 8}"),
                         (1, f"T.shift_right({w}, T.broadcast(T.uint8(4), {B}))", f"g * {G} + {c * 8 + 4}")]
            for ch, we, k in parts:
                if isa == "avx2":  # one int16 sum over both nibbles (bound above)
                    pairs[ch if spec.bits == 8 else 0].append((we, x_word(k)))
                else:
                    chains[ch] = f'T.call_llvm_pure_intrin("int32x{L}", "{intrin}", {chains[ch]}, {weights(we)}, {x_word(k)})'
        if isa == "avx2":
            for ch in chains:
                chains[ch] = _avx2_chain(pairs[ch], spec.bits, L)
        # the group's int32 sums of this chunk, then y += dx * s * (Σ xq·(q - off) + (off - z) Σ xq)
        lanes = f"T.ramp({jj * L}, 1, {L})"
        z = (f"T.broadcast(T.float32({spec.zero_point - off}) * xs[m, g], {L})" if spec.symmetric
             else f"(zp[nb, g, {lanes}] - T.broadcast(T.float32({off}), {L})) * T.broadcast(xs[m, g], {L})")
        lines.append(f"acc[{lanes}] = acc[{lanes}] + (T.Cast(\"float32x{L}\", {chains[0]} + {chains[1]}) - {z}) "
                     f"* (sc[nb, g, {lanes}] * T.broadcast(xd[m, g], {L}))")
    body = "".join(ind + ln + "\n" for ln in lines)
    lr = ""
    if spec.rank:
        lr = f"""            for r in range({spec.rank}):
                for j in T.vectorized({V}):
                    acc[j] = acc[j] + t[m, r] * {f32_expr(spec, 'b[nb, r, j]')}
"""
    return signature(spec) + low_rank_t(spec) + _quantize(spec) + f"""    for nb in T.parallel(N // {V}):
        acc = T.decl_buffer(({V},), "float32")
        for m in range(M):
            for j in T.vectorized({V}):
                acc[j] = T.float32(0)
            for g in range(K // {G}):
{body}{lr}            for j in T.vectorized({V}):
                y[m, nb * {V} + j] = acc[j]
"""

"""TIR (TVMScript) of the CPU kernels: x86 AVX2 / AVX-512 and aarch64 NEON.

The schedule is written into the loop nest (this is TVM's "schedule as TIR"): output blocks of
``spec.block`` channels are the parallel loop (one block per task, the whole K reduction in it),
the ``block`` lanes are the vectorized loop (one vector load of codes, one FMA per input position
and lane), and the group scale is applied once per group. The ISA enters through ``spec.block``
(8 float lanes for AVX2 and NEON x2, 16 for AVX-512) and the LLVM target the function is
compiled for (:mod:`edgeq.kernels.compile`).

* decode (M small, typically 1): per output block and row, accumulate ``block`` outputs over K
  (codes converted and centred in registers), add the low-rank term ``t · B`` where
  ``t = x · Aᵀ`` (M, rank) is computed first, store.
* prefill (M > 1): per output block and group, dequantize the (group, block) weight tile once into
  a local buffer, then stream the rows of ``x`` through it ``prefill_rows(block)`` at a time, one
  register accumulator per row (weights read once per call, not per row; independent FMA chains).

Small fixed-size scratch (accumulators) is declared without ``scope="local"``: on a CPU target TVM
places "local" buffers in heap workspace (an allocation per call or task, and stores LLVM cannot
drop since it cannot prove they do not alias the arguments), while a small "global" one becomes a
stack array that LLVM keeps in registers.

All shapes are symbolic: ``K`` is taken from ``x`` and ``N`` from ``y`` (the active widths of a
pruned layer), the weight buffers may be larger (the full widths).
"""
from __future__ import annotations

from edgeq.kernels.spec import KernelSpec

_HEADER = ""  # parsed with T = tvm.script.tirx in scope (edgeq.kernels.compile)


def signature(spec: KernelSpec) -> str:
    V, R = spec.block, spec.rank
    args = ["x_h: T.handle", "qw_h: T.handle", "sc_h: T.handle"]
    bufs = [
        "x = T.match_buffer(x_h, (M, K), \"float32\")",
        "qw = T.match_buffer(qw_h, (NB, KP, %d), \"uint8\")" % (4 * V if spec.dot_layout else V),
        "sc = T.match_buffer(sc_h, (NB, NG, %d), \"float32\")" % V,
    ]
    if not spec.symmetric:
        args.append("zp_h: T.handle")
        bufs.append("zp = T.match_buffer(zp_h, (NB, NG, %d), \"float32\")" % V)
    if R:
        args += ["a_h: T.handle", "b_h: T.handle"]
        bufs += ["a = T.match_buffer(a_h, (KA, %d), \"%s\")" % (R, spec.lr_dtype),
                 "b = T.match_buffer(b_h, (NBB, %d, %d), \"%s\")" % (R, V, spec.lr_dtype)]
    args.append("y_h: T.handle")
    bufs.append("y = T.match_buffer(y_h, (M, N), \"float32\")")
    lines = [f"@T.prim_func\ndef {spec.name}({', '.join(args)}):",
             f"    T.func_attr({{\"global_symbol\": \"{spec.name}\", \"tir.noalias\": True}})"]
    for v in ("M", "K", "N", "NB", "KP", "NG") + (("KA", "NBB") if R else ()):
        lines.append(f"    {v} = T.int64()")
    lines += ["    " + b for b in bufs]
    return "\n".join(lines) + "\n"


def centred(spec: KernelSpec, row: str, j: str) -> tuple[str, ...]:
    """Expressions of the centred codes (q - z) in packed row ``row``, lane ``j``: one per input
    position held by the byte (two for 4-bit)."""
    z = "T.float32(%d)" % spec.zero_point if spec.symmetric else f"zp[nb, g, {j}]"
    byte = f"qw[nb, {row}, {j}]"
    if spec.bits == 8:
        return (f"(T.Cast(\"float32\", {byte}) - {z})",)
    return (f"(T.Cast(\"float32\", T.bitwise_and({byte}, T.uint8(15))) - {z})",
            f"(T.Cast(\"float32\", T.shift_right({byte}, T.uint8(4))) - {z})")


def f32_expr(spec: KernelSpec, load: str) -> str:
    """A low-rank factor element as float32 (converted when the factors are stored in float16)."""
    return load if spec.lr_dtype == "float32" else f"T.Cast(\"float32\", {load})"


def low_rank_t(spec: KernelSpec) -> str:
    if not spec.rank:
        return ""
    return f"""    t = T.decl_buffer((M, {spec.rank}), "float32")
    for m in range(M):
        for r in T.vectorized({spec.rank}):
            t[m, r] = T.float32(0)
        for k in range(K):
            for r in T.vectorized({spec.rank}):
                t[m, r] = t[m, r] + x[m, k] * {f32_expr(spec, 'a[k, r]')}
"""


def _codes(spec: KernelSpec, row: str, j: str) -> tuple[str, ...]:
    """The raw codes (as float) in packed row ``row``, lane ``j`` (two for 4-bit)."""
    byte = f"qw[nb, {row}, {j}]"
    if spec.bits == 8:
        return (f"T.Cast(\"float32\", {byte})",)
    return (f"T.Cast(\"float32\", T.bitwise_and({byte}, T.uint8(15)))",
            f"T.Cast(\"float32\", T.shift_right({byte}, T.uint8(4)))")


def decode_source(spec: KernelSpec) -> str:
    """Per group: gacc = sum x * q over the raw codes, then (gacc - z * sum x) * s — the zero
    point leaves the inner loop (one subtraction per group and lane instead of per code)."""
    V, G = spec.block, spec.group
    per = 2 if spec.bits == 4 else 1  # input positions per byte
    rows = G // per
    c = _codes(spec, f"g * {rows} + kk", "j")
    terms = " + ".join(f"x[m, g * {G} + kk * {per} + {p}] * {c[p]}" for p in range(per))
    z = "T.float32(%d)" % spec.zero_point if spec.symmetric else "zp[nb, g, j]"
    lr = ""
    if spec.rank:
        lr = f"""            for r in range({spec.rank}):
                for j in T.vectorized({V}):
                    acc[j] = acc[j] + t[m, r] * {f32_expr(spec, 'b[nb, r, j]')}
"""
    return _HEADER + signature(spec) + low_rank_t(spec) + f"""    xs = T.decl_buffer((M, K // {G}), "float32")
    for m in range(M):
        for g in range(K // {G}):
            xs[m, g] = T.float32(0)
            for kk in range({G}):
                xs[m, g] = xs[m, g] + x[m, g * {G} + kk]
    for nb in T.parallel(N // {V}):
        acc = T.decl_buffer(({V},), "float32")
        gacc = T.decl_buffer(({V},), "float32")
        for m in range(M):
            for j in T.vectorized({V}):
                acc[j] = T.float32(0)
            for g in range(K // {G}):
                for j in T.vectorized({V}):
                    gacc[j] = T.float32(0)
                for kk in range({rows}):
                    for j in T.vectorized({V}):
                        gacc[j] = gacc[j] + {terms}
                for j in T.vectorized({V}):
                    acc[j] = acc[j] + (gacc[j] - {z} * xs[m, g]) * sc[nb, g, j]
{lr}            for j in T.vectorized({V}):
                y[m, nb * {V} + j] = acc[j]
"""


ACC_FLOATS = 64  # floats of accumulators a kernel keeps in registers (8 AVX2 registers)


def prefill_rows(block: int) -> int:
    """Rows of ``x`` per register block in the prefill kernel: ``ACC_FLOATS`` accumulators in all
    (8 rows at block 8, 2 at block 32). Their 256 bytes stay under TVM's stack limit for scratch
    (1024 bytes; larger scratch goes to heap workspace, and LLVM keeps it in memory)."""
    return max(1, ACC_FLOATS // block)


def prefill_source(spec: KernelSpec) -> str:
    """Per output block and group: dequantize the (group, block) weight tile once into a local
    buffer, then stream the rows of ``x`` through it ``prefill_rows(block)`` at a time — one vector
    load of the tile feeds as many independent FMA chains (register blocking over rows:
    one chain per row would wait on the FMA latency and reload the tile per row); the rows past
    the last whole block go one at a time."""
    V, G, RB = spec.block, spec.group, prefill_rows(spec.block)
    per = 2 if spec.bits == 4 else 1
    rows = G // per
    c = centred(spec, f"g * {rows} + kk", "j")
    fill = "\n".join(f"""                    for j in T.vectorized({V}):
                        w[kk * {per} + {p}, j] = {c[p]} * sc[nb, g, j]""" for p in range(per))
    lr = ""
    if spec.rank:
        lr = f"""            for r in range({spec.rank}):
                for j in T.vectorized({V}):
                    y[m, nb * {V} + j] = y[m, nb * {V} + j] + t[m, r] * {f32_expr(spec, 'b[nb, r, j]')}
"""
    return _HEADER + signature(spec) + low_rank_t(spec) + f"""    for nb in T.parallel(N // {V}):
        w = T.decl_buffer(({G}, {V}), "float32", scope="local")
        acc = T.decl_buffer(({RB}, {V}), "float32")
        for m in range(M):
            for j in T.vectorized({V}):
                y[m, nb * {V} + j] = T.float32(0)
{lr}        for g in range(K // {G}):
            for kk in range({rows}):
{fill}
            for mb in range(M // {RB}):
                for i in T.unroll({RB}):
                    for j in T.vectorized({V}):
                        acc[i, j] = T.float32(0)
                for kk in range({G}):
                    for i in T.unroll({RB}):
                        for j in T.vectorized({V}):
                            acc[i, j] = acc[i, j] + x[mb * {RB} + i, g * {G} + kk] * w[kk, j]
                for i in T.unroll({RB}):
                    for j in T.vectorized({V}):
                        y[mb * {RB} + i, nb * {V} + j] = y[mb * {RB} + i, nb * {V} + j] + acc[i, j]
            for mr in range(M % {RB}):
                for j in T.vectorized({V}):
                    acc[0, j] = T.float32(0)
                for kk in range({G}):
                    for j in T.vectorized({V}):
                        acc[0, j] = acc[0, j] + x[M // {RB} * {RB} + mr, g * {G} + kk] * w[kk, j]
                for j in T.vectorized({V}):
                    y[M // {RB} * {RB} + mr, nb * {V} + j] = y[M // {RB} * {RB} + mr, nb * {V} + j] + acc[0, j]
"""


def source(spec: KernelSpec) -> str:
    return prefill_source(spec) if spec.prefill else decode_source(spec)

"""TIR (TVMScript) of the CUDA kernels (T4 sm_75, RTX 3060 sm_86, RTX 4090 laptop sm_89).

One thread per output channel: ``blockIdx.x`` walks the output blocks, ``threadIdx.x`` the
``spec.block`` lanes of a block (32 = one warp, so a warp's code loads are one contiguous
32-byte row of the layout: coalesced). Each thread reduces over K with the group scale applied
once per group, adds the low-rank term and stores; ``t = x · Aᵀ`` (M, rank) is a first, small
kernel (``blockIdx.x`` = row, ``threadIdx.x`` = rank index). Decode and prefill share the
structure (prefill loops over the rows inside the thread, so each code is loaded once per call).
Shapes are symbolic as in :mod:`edgeq.kernels.tir_cpu`.
"""
from __future__ import annotations

from edgeq.kernels.spec import KernelSpec
from edgeq.kernels.tir_cpu import centred, f32_expr, signature


def source(spec: KernelSpec) -> str:
    V, G, R = spec.block, spec.group, spec.rank
    per = 2 if spec.bits == 4 else 1
    rows = G // per
    c = centred(spec, f"g * {rows} + kk", "j")
    terms = " + ".join(f"x[m, g * {G} + kk * {per} + {p}] * {c[p]}" for p in range(per))
    t = ""
    lr = ""
    if R:
        t = f"""    t = T.decl_buffer((M, {R}), "float32")
    for m in T.thread_binding(M, thread="blockIdx.x"):
        for r in T.thread_binding({R}, thread="threadIdx.x"):
            t[m, r] = T.float32(0)
            for k in range(K):
                t[m, r] = t[m, r] + x[m, k] * {f32_expr(spec, 'a[k, r]')}
"""
        lr = f"""                for r in range({R}):
                    acc[0] = acc[0] + t[m, r] * {f32_expr(spec, 'b[nb, r, j]')}
"""
    return signature(spec) + t + f"""    for nb in T.thread_binding(N // {V}, thread="blockIdx.x"):
        for j in T.thread_binding({V}, thread="threadIdx.x"):
            acc = T.decl_buffer((1,), "float32", scope="local")
            gacc = T.decl_buffer((1,), "float32", scope="local")
            for m in range(M):
                acc[0] = T.float32(0)
                for g in range(K // {G}):
                    gacc[0] = T.float32(0)
                    for kk in range({rows}):
                        gacc[0] = gacc[0] + {terms}
                    acc[0] = acc[0] + gacc[0] * sc[nb, g, j]
{lr}                y[m, nb * {V} + j] = acc[0]
"""

"""Compiled decoder functions vs numpy oracles written here: embedding row (float and integer-dot
layouts, scaled), RMSNorm, residual add + norm (and Gemma 3's post-norm form), attention over the
KV cache with RoPE, rate masks and grouped heads (and Gemma 3's QK-norm and sliding window),
SwiGLU / GeGLU at a pruned (prefix) MLP width.

Every test runs on two forms: the CPU functions (edgeq.kernels.tir_decoder) and the CUDA kernels
(edgeq.kernels.tir_decoder_cuda) emulated on this CPU — the same TVMScript with the thread loops
serial and the barriers dropped, which is the kernels' semantics phase by phase. The CUDA form
itself is compiled by TVM and nvcc for the GPU profiles' architectures at the end."""
import platform

import numpy as np
import pytest

import tvm

from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.kernels import compile as kc  # noqa: E402
from edgeq.kernels import layout  # noqa: E402
from edgeq.kernels.spec import KernelSpec  # noqa: E402
from edgeq.kernels import tir_decoder_cuda as tdc  # noqa: E402
from edgeq.kernels.tir_decoder import LANES, DecoderSpec, fast_exp  # noqa: E402
from cuda_tools import cubin_listing  # noqa: E402

HASWELL = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
SPEC = DecoderSpec(hidden=96, heads=6, kv_heads=2, head_dim=16, block=32)
DOT = DecoderSpec(hidden=96, heads=6, kv_heads=2, head_dim=16, block=32, dot_layout=True)
GEMMA = DecoderSpec(hidden=96, heads=6, kv_heads=2, head_dim=16, block=32, act="gelu_tanh", qk_norm=True,
                    sandwich=True)
TOL = 2e-6  # float32 with sums in another order: relative to the largest output

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="compiled for an x86 profile")


# widths at the CUDA form's thread counts (hidden a multiple of its 256 threads, head_dim / 2 of its 128):
# the kernels' unguarded paths; the small specs above take the guarded ones
WIDE = DecoderSpec(hidden=512, heads=4, kv_heads=2, head_dim=256, block=32, act="gelu_tanh", qk_norm=True,
                   sandwich=True)


@pytest.fixture(scope="module", params=["cpu", "cuda-emulated"])
def lib(request):
    if request.param == "cpu":
        return kc.build([KernelSpec(bits=8, block=32)], HASWELL, (SPEC, DOT, GEMMA, WIDE))
    funcs = {}
    for spec in (SPEC, DOT, GEMMA, WIDE):
        funcs.update(kc.decoder_funcs(tdc.sources(spec, emulate=True)))
    return tvm.compile(tvm.IRModule(funcs), target=kc._target(HASWELL))


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _close(got, want, tol=TOL):
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max())))


def _rms(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("SPEC", [SPEC, WIDE], ids=["h96", "h512"])
def test_norm_and_residual_add_norm(lib, SPEC):
    GEMMA = SPEC if SPEC.sandwich else globals()["GEMMA"]
    rng = np.random.default_rng(0)
    H, eps = SPEC.hidden, 1e-5
    x, y, b, w = (rng.standard_normal((1, H)).astype(np.float32) for _ in range(4))
    b, w = b[0], w[0]
    h = _t(np.zeros((1, H), np.float32))
    lib[SPEC.names()["norm"]](_t(x), _t(w), h, eps)
    _close(h.numpy(), _rms(x, w, eps))
    xt = _t(x)
    lib[SPEC.names()["add_norm"]](xt, _t(y), _t(b), _t(w), h, eps)
    _close(xt.numpy(), x + y + b)
    _close(h.numpy(), _rms(x.astype(np.float64) + y + b, w, eps))
    # Gemma 3's sandwich form: x += rmsnorm(y + b) * pw, then h = rmsnorm(x) * w
    pw = rng.standard_normal(H).astype(np.float32)
    xt = _t(x)
    lib[GEMMA.names()["post_add_norm"]](xt, _t(y), _t(b), _t(pw), _t(w), h, eps)
    x2 = x.astype(np.float64) + _rms(y.astype(np.float64) + b, pw, eps)
    _close(xt.numpy(), x2)
    _close(h.numpy(), _rms(x2, w, eps))


def _rope(v, c, s):
    """[half 0 | half 1] rotation of (..., D) by cos / sin (..., D/2)."""
    a, b = np.split(v, 2, axis=-1)
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


@pytest.mark.parametrize("pos,win,spec", [(0, 0, SPEC), (7, 0, SPEC), (10, 0, SPEC), (10, 4, GEMMA),
                                          (10, 0, GEMMA), (2, 4, GEMMA), (10, 4, WIDE), (0, 0, WIDE)])
def test_attention_over_the_cache_with_rope_masks_and_grouped_heads(lib, pos, win, spec):
    """Plain (Llama / Qwen2) and Gemma 3 (QK-norm; a sliding window of ``win`` keys when > 0)."""
    rng = np.random.default_rng(pos + win)
    H, KV, D, NL, C, layer, eps = spec.heads, spec.kv_heads, spec.head_dim, 3, 12, 1, 1e-6
    qkv = rng.standard_normal((1, spec.qkv)).astype(np.float32)
    b = rng.standard_normal(spec.qkv).astype(np.float32)
    m = (rng.random(spec.qkv) > 0.3).astype(np.float32)  # a rate's masks of Q/K pairs and V components
    om = (rng.random(H * D) > 0.3).astype(np.float32)
    f = rng.random((KV, D // 2)).astype(np.float32)  # each KV head's gathered pair frequencies
    qn, kn = (rng.standard_normal(D).astype(np.float32) for _ in range(2))
    kc_, vc_ = (rng.standard_normal((NL, KV, C, D)).astype(np.float32) for _ in range(2))
    scale = D ** -0.5
    kt, vt, o = _t(kc_), _t(vc_), _t(np.zeros((1, H * D), np.float32))
    ang = np.arange(C, dtype=np.float32)[:, None, None] * f[None]  # the runtime's RoPE tables
    norms = (_t(qn), _t(kn)) if spec.qk_norm else ()
    tail = (layer, scale, win) + ((eps,) if spec.qk_norm else ())
    lib[spec.names()["attention"]](_t(qkv), _t(b), _t(m), _t(np.cos(ang)), _t(np.sin(ang)), kt, vt,
                                   _t(np.full((H, C + LANES), np.nan, np.float32)),
                                   _t(np.array([pos, 0], np.int32)), _t(om), o, *norms, *tail)
    # oracle (float64)
    v = (qkv[0].astype(np.float64) + b) * m
    q, k, vv = v[:H * D].reshape(H, D), v[H * D:(H + KV) * D].reshape(KV, D), v[(H + KV) * D:].reshape(KV, D)
    if spec.qk_norm:
        q, k = _rms(q, qn, eps), _rms(k, kn, eps)
    ang = (np.float32(pos) * f).astype(np.float64)
    c, s = np.cos(ang), np.sin(ang)
    kr = _rope(k, c, s)
    want_k, want_v = kc_.astype(np.float64), vc_.astype(np.float64)
    want_k[layer, :, pos], want_v[layer, :, pos] = kr, vv
    got_k, got_v = kt.numpy(), vt.numpy()
    _close(got_k, want_k)
    _close(got_v, want_v)
    grp = H // KV
    lo = max(0, pos - win + 1) if win else 0
    out = np.zeros((H, D))
    for hd in range(H):
        g = hd // grp
        qr = _rope(q[hd], c[g], s[g])
        sc = want_k[layer, g, lo:pos + 1] @ qr * scale
        p = np.exp(sc - sc.max())
        out[hd] = (p / p.sum()) @ want_v[layer, g, lo:pos + 1]
    _close(o.numpy()[0], out.reshape(-1) * om, 1e-5)
    # the cache past pos (and other layers) untouched
    np.testing.assert_array_equal(got_k[layer, :, pos + 1:], kc_[layer, :, pos + 1:])
    np.testing.assert_array_equal(got_k[0], kc_[0])


@pytest.mark.parametrize("spec", [SPEC, GEMMA], ids=["swiglu", "geglu"])
@pytest.mark.parametrize("f_blocks", [3, 1])  # the full width and a pruned prefix
def test_glu_over_interleaved_blocks_at_an_active_width(lib, f_blocks, spec):
    rng = np.random.default_rng(f_blocks)
    V, full = SPEC.block, 3
    f = f_blocks * V
    gu_full = rng.standard_normal(2 * full * V).astype(np.float32)
    bias = rng.standard_normal(2 * full * V).astype(np.float32)
    a = _t(np.zeros((1, f), np.float32))
    lib[spec.names()["glu"]](_t(gu_full[:2 * f].reshape(1, -1)), _t(bias), a)
    z = (gu_full[:2 * f] + bias[:2 * f]).astype(np.float64).reshape(f_blocks, 2, V)  # (block, gate|up, lane)
    g, u = z[:, 0], z[:, 1]
    if spec.act == "silu":
        act = g / (1 + np.exp(-g))
    else:  # GELU, tanh approximation
        act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    _close(a.numpy()[0], (act * u).reshape(-1))


@pytest.mark.parametrize("spec", [SPEC, DOT], ids=["float", "dot"])
def test_embedding_row_from_the_blocked_int8_table(lib, spec):
    rng = np.random.default_rng(3)
    n, k = 4 * spec.block, spec.hidden
    codes = rng.integers(0, 256, (n, k)).astype(np.uint8)
    scales = rng.random((n, k // 32)).astype(np.float32)
    packed = layout.pack_weight(codes, scales, None, KernelSpec(bits=8, block=spec.block,
                                                                act="int8" if spec.dot_layout else "float32"))
    for tok, escale in ((0, 1.0), (37, 1.0), (n - 1, 1.0), (37, 9.797959)):
        x = _t(np.zeros((1, k), np.float32))
        lib[spec.names()["embed"]](_t(packed["qw"]), _t(packed["sc"]), _t(np.array([0, tok], np.int32)), x, escale)
        want = (codes[tok].astype(np.float32) - 128) * np.repeat(scales[tok], 32) * np.float32(escale)
        np.testing.assert_array_equal(x.numpy()[0], want)  # the numpy decoder's float32 products, bit for bit


def test_fast_exp_is_within_a_few_ulp_of_exp():
    from tvm.script import tirx as T

    n = 4096
    src = f"""@T.prim_func
def fexp(x_h: T.handle, y_h: T.handle):
    T.func_attr({{"global_symbol": "fexp", "tir.noalias": True}})
    x = T.match_buffer(x_h, ({n},), "float32")
    y = T.match_buffer(y_h, ({n},), "float32")
    for i in T.vectorized({n}):
        y[i] = {fast_exp("x[i]")}
"""
    ex = tvm.compile(tvm.IRModule({"fexp": tvm.script.from_source(src, extra_vars={"T": T})}),
                     target=tvm.target.Target(HASWELL))
    x = np.concatenate([np.linspace(-87, 88, n - 6), [0.0, -1e-8, 1e-8, -120.0, -1e30, 1e-30]]).astype(np.float32)
    y = _t(np.zeros(n, np.float32))
    ex["fexp"](_t(x), y)
    got, want = y.numpy().astype(np.float64), np.exp(x.astype(np.float64))
    ok = np.abs(x) <= 87
    assert np.all(np.abs(got[ok] - want[ok]) <= 4 * np.spacing(want[ok].astype(np.float32)))
    assert np.all(got[x < -87.4] <= 1.2e-38)  # clamped: at most the smallest normal, never negative or NaN
    assert np.all(got[x < -87.4] >= 0)


def test_spec_refuses_widths_it_cannot_vectorize():
    with pytest.raises(EdgeqError, match="multiples"):
        DecoderSpec(hidden=100, heads=4, kv_heads=2, head_dim=16, block=32)
    with pytest.raises(EdgeqError, match="KV heads"):
        DecoderSpec(hidden=96, heads=5, kv_heads=2, head_dim=16, block=32)
    with pytest.raises(EdgeqError, match="activation"):
        DecoderSpec(hidden=96, heads=6, kv_heads=2, head_dim=16, block=32, act="relu")


CUDA_SPECS = (DecoderSpec(hidden=576, heads=9, kv_heads=3, head_dim=64, block=32),  # SmolLM2-135M's shape
              DecoderSpec(hidden=640, heads=4, kv_heads=1, head_dim=256, block=32, act="gelu_tanh", qk_norm=True,
                          sandwich=True))  # Gemma 3 270M's


@pytest.mark.parametrize("arch", ["sm_75", "sm_86", "sm_89"])
def test_cuda_form_compiles_with_nvcc(tmp_path, arch):
    """A CUDA build carries the decoder as GPU kernels (same names as the CPU functions), next to the
    matmul kernels; nvcc compiles TVM's source for each GPU profile's architecture."""
    ex = kc.build([KernelSpec(bits=4, block=32)], {"kind": "cuda", "arch": arch}, CUDA_SPECS)
    src = kc.cuda_source(ex)
    names = sorted({n for spec in CUDA_SPECS for n in spec.names().values()})
    for n in names:
        assert f"{n}_kernel" in src, n
    assert "__syncthreads()" in src  # the phases of the reductions are separated by barriers
    cubin = kc.nvcc_cubin(src, arch, tmp_path / f"dec_{arch}.cubin")
    listing = cubin_listing(cubin, arch)
    for n in names:
        assert f"{n}_kernel" in listing, n

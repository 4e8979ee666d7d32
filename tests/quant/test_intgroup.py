"""edgeq.quant.intgroup: int4/int8 group format, its codec, and onnxruntime's MatMulNBits layout."""
from __future__ import annotations

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.quant.intgroup import (
    IntGroupFormat,
    IntGroupTensor,
    dequantized,
    fit_format,
    int_codec,
    parse_int_format,
    rtn_int,
)

FORMAT_NAMES = [f"int{b}_g{g}_{s}" for b in (4, 8) for g in (32, 64, 128) for s in ("sym", "asym")]


def _w(n=24, k=384, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


# --------------------------------------------------------------------------- names


def test_names_round_trip():
    for name in FORMAT_NAMES:
        fmt = parse_int_format(name)
        assert fmt.name == name == str(fmt) and parse_int_format(fmt) is fmt
    assert parse_int_format("INT4_G32_SYM") == IntGroupFormat(4, 32, True)
    assert IntGroupFormat(8, 128, False).name == "int8_g128_asym"
    assert IntGroupFormat(4, 64, True).default_zero_point == 8
    assert IntGroupFormat(8, 64, True).default_zero_point == 128


@pytest.mark.parametrize("bad", ["int4", "int4_g32", "int3_g32_sym", "int4_g48_sym", "q4_0", "int4_g32_symm", ""])
def test_bad_names(bad):
    with pytest.raises(EdgeqError) as ei:
        parse_int_format(bad)
    assert "\n" not in str(ei.value)


def test_group_falls_back_to_a_divisor_of_the_width():
    assert fit_format("int4_g128_sym", 576).group == 64
    assert fit_format("int4_g128_sym", 1536).group == 128
    assert fit_format("int8_g32_asym", 96).name == "int8_g32_asym"
    with pytest.raises(EdgeqError, match="divides"):
        fit_format("int4_g32_sym", 40)


def test_dequantized_is_rtn_in_the_fitted_format():
    w = _w(k=96)
    assert dequantized(w, None) is w
    got = dequantized(w, "int4_g64_sym")  # 96 inputs: group 32
    np.testing.assert_array_equal(got, rtn_int(w, IntGroupFormat(4, 32, True)).dequantize())
    assert not np.array_equal(got, w)


def test_bad_shapes():
    with pytest.raises(EdgeqError, match="multiple of 32, got 48"):
        rtn_int(np.zeros((2, 48), np.float32), "int4_g32_sym")
    with pytest.raises(EdgeqError, match="multiple of 128, got 64"):
        rtn_int(np.zeros((2, 64), np.float32), IntGroupFormat(8, 128, False))
    with pytest.raises(EdgeqError, match="2-D"):
        rtn_int(np.zeros(64, np.float32), "int4_g32_sym")
    with pytest.raises(EdgeqError, match="bits 4 or 8"):
        IntGroupFormat(2, 32, True)
    t = rtn_int(_w(2, 64), "int4_g32_asym")
    with pytest.raises(EdgeqError, match="zero points"):
        IntGroupTensor(t.fmt, t.shape, t.codes, t.scales, None)
    with pytest.raises(EdgeqError, match="scales"):
        IntGroupTensor(t.fmt, t.shape, t.codes, t.scales[:, :1], t.zero_points)


# --------------------------------------------------------------------------- rtn


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_rtn_int(name):
    fmt = parse_int_format(name)
    w = _w()
    w[0, : fmt.group] = 0.0  # an all-zero group
    w[1, : fmt.group] = np.abs(w[1, : fmt.group]) + 1  # an all-positive group
    t = rtn_int(w, fmt)
    n, k = w.shape
    nb = k // fmt.group
    assert t.codes.shape == (n, k) and t.codes.dtype == np.uint8 and t.codes.max() < 1 << fmt.bits
    assert t.scales.shape == (n, nb) and t.scales.dtype == np.float32
    np.testing.assert_array_equal(t.scales, t.scales.astype(np.float16).astype(np.float32))
    assert (t.zero_points is None) == fmt.symmetric
    y = t.dequantize()
    assert y.dtype == np.float32 and y.shape == w.shape
    assert not y[0, : fmt.group].any()
    g = w.reshape(n, nb, fmt.group)
    err = np.abs(y - w).reshape(n, nb, fmt.group)
    step = np.abs(t.scales)[..., None]
    if fmt.symmetric:
        # the largest-magnitude value sits exactly on code 0 -> -2^(b-1) * scale (up to fp16 rounding)
        i = np.abs(g).argmax(axis=-1)
        codes = t.codes.reshape(n, nb, fmt.group)
        assert (np.take_along_axis(codes, i[..., None], -1) == 0)[1:].all()
        assert (err <= step * 1.01 + 1e-6).all()  # at most one step (the clipped top code)
    else:
        # half a step inside the representable range; the rounded zero point can shift the range
        # by up to half a step, so an end value may be up to one step off
        zp = t.zero_points.astype(np.float32)[..., None]
        s_ = t.scales[..., None]
        inside = (g >= s_ * (0 - zp)) & (g <= s_ * ((1 << fmt.bits) - 1 - zp))
        assert (err <= np.where(inside, step * 0.51, step * 1.01) + 1e-6).all()
        assert (t.zero_points.reshape(-1) <= (1 << fmt.bits) - 1).all()
    # packed size: codes + fp16 scales (+ zero points packed `bits` wide per row)
    zp_bytes = 0 if fmt.symmetric else n * -(-nb * fmt.bits // 8)
    assert t.nbytes == n * k * fmt.bits // 8 + 2 * n * nb + zp_bytes
    mats = t.to_matmulnbits()
    assert mats["B"].shape == (n, nb, fmt.group * fmt.bits // 8) and mats["B"].dtype == np.uint8
    assert mats["scales"].shape == (n * nb,)
    assert sum(a.nbytes for a in mats.values()) - 2 * mats["scales"].size == t.nbytes


def test_more_bits_smaller_error():
    w = _w(32, 512, seed=4)
    e = {name: float(((rtn_int(w, name).dequantize() - w) ** 2).mean()) for name in FORMAT_NAMES}
    for g in (32, 64, 128):
        for s in ("sym", "asym"):
            assert e[f"int8_g{g}_{s}"] < e[f"int4_g{g}_{s}"] / 100
    assert e["int4_g32_sym"] < e["int4_g128_sym"] and e["int4_g32_asym"] < e["int4_g128_asym"]


# --------------------------------------------------------------------------- codec


@pytest.mark.parametrize("name", ["int4_g32_sym", "int4_g64_asym", "int8_g32_sym", "int8_g128_asym"])
def test_codec_interface(name):
    fmt = parse_int_format(name)
    c = int_codec(name)
    assert int_codec(fmt) is c and c.block == fmt.group and c.qtype is None
    rng = np.random.default_rng(9)
    x = rng.standard_normal((20, c.block)).astype(np.float32)
    p, q = c.rtn(x)
    cols = np.arange(c.block)
    # pack / unpack round trip
    p2, q2 = c.unpack(c.pack(p, q))
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(c.decode(p2, q2, cols), c.decode(p, q, cols))
    # decode == the tensor container's dequantize
    t = IntGroupTensor.from_blocks(fmt, (20, c.block), p, q)
    np.testing.assert_array_equal(t.dequantize(), c.decode(p, q, cols))
    # encode is the nearest code (brute force), for a subset of columns and beyond the range
    sub = np.array([1, 7, c.block - 1])
    for v in (x[:, sub], x[:, sub] * 2):
        got = c.encode(p, v, sub)
        allq = np.arange(c.qmin, c.qmax + 1)
        vals = np.stack([c.decode(p, np.full(v.shape, k, np.int16), sub) for k in allq], -1)
        best = np.abs(vals - v[..., None]).min(-1)
        np.testing.assert_array_equal(np.abs(c.decode(p, got, sub) - v), best)


@pytest.mark.parametrize("name", ["int4_g32_sym", "int4_g128_asym", "int8_g64_asym"])
def test_weighted_fit_reduces_weighted_error(name):
    c = int_codec(name)
    rng = np.random.default_rng(13)
    x = rng.standard_t(3, (300, c.block)).astype(np.float32)
    w = rng.exponential(1.0, (300, c.block)) ** 3
    cols = np.arange(c.block)

    def werr(p):
        r = c.decode(p, c.encode(p, x, cols), cols).astype(np.float64) - x
        return (w * r * r).sum(axis=1)

    e0, e1 = werr(c.fit(x)), werr(c.fit(x, w))
    assert (e1 <= e0 + 1e-12).all() and e1.sum() < 0.97 * e0.sum()


# --------------------------------------------------------------------------- onnxruntime


def _matmulnbits_model(t: IntGroupTensor, scales_2d: bool):
    from onnx import TensorProto, helper, numpy_helper

    attrs = t.matmulnbits_attributes()
    mats = t.to_matmulnbits()
    names, inits = ["A"], []
    for key in ("B", "scales", "zero_points"):
        if key in mats:
            arr = mats[key]
            if scales_2d and key != "B":  # the newer documented (N, ...) shapes
                arr = arr.reshape(t.shape[0], -1)
            inits.append(numpy_helper.from_array(arr, key))
            names.append(key)
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, attrs["K"]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, attrs["N"]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("scales_2d", [False, True], ids=["flat", "2d"])
@pytest.mark.parametrize("name", ["int4_g32_sym", "int4_g32_asym", "int4_g128_asym", "int4_g64_sym",
                                  "int8_g32_sym", "int8_g128_asym"])
def test_onnxruntime_matmulnbits(name, scales_2d):
    """onnxruntime's own MatMulNBits (the pinned onnxruntime 1.32 has 4- and 8-bit kernels) on our
    packed weights equals x @ dequantized.T. Any failure to load the graph is a failure: the ONNX
    format depends on exactly these kernels."""
    import onnxruntime as ort

    fmt = parse_int_format(name)
    k = 3 * 128  # 3 groups of 128 per row: an odd group count exercises 4-bit zero-point padding
    t = rtn_int(_w(40, k, seed=7), fmt)
    x = np.random.default_rng(8).standard_normal((6, k)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(_matmulnbits_model(t, scales_2d).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    y = sess.run(None, {"A": x})[0]
    ref = x @ t.dequantize().T
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# --------------------------------------------------------------------------- fast encoder


def _hard_blocks(c, rng, rows=257):
    """Blocks that stress the encoder: exact ties (values on half steps of the block's scale),
    zero blocks (scale 0), tiny values (fp16-subnormal scales), huge values (scale clipped to
    the fp16 maximum), inf / nan, values beyond the fitted range (GPTQ-style), heavy tails."""
    x = rng.standard_t(2, (rows, c.block)).astype(np.float32)
    x[0] = 0.0
    x[1] *= np.float32(1e-7)
    x[2] *= np.float32(1e-30)
    x[3] *= np.float32(1e6)
    x[4, 3], x[5, 7], x[6, 0] = np.inf, -np.inf, np.nan
    p = c.fit(x)
    # exact ties: d * (k + 1/2) for in-range k, written into rows 7..
    d = p.d[7:40].astype(np.float64)[:, None]
    zp = c.fmt.default_zero_point if p.zp is None else p.zp[7:40].astype(np.float64)[:, None]
    k = rng.integers(0, c.qmax, (33, c.block))
    x[7:40] = (d * (k - zp + 0.5)).astype(np.float32)
    # neighbours of ties, one float32 ulp either side
    x[40:60] = np.nextafter(x[7:27], np.float32(np.inf))
    x[60:80] = np.nextafter(x[7:27], np.float32(-np.inf))
    return x, p


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_fast_encode_equals_the_candidate_search(name):
    """IntGroupCodec.encode (one float64 division per value) gives the very codes of the generic
    candidate search of Codec.encode (four candidates, errors compared on decoded values), on
    hard inputs, for whole blocks, column subsets, and values beyond the fitted range."""
    from edgeq.quant.codec_base import Codec

    c = int_codec(name)
    rng = np.random.default_rng(21)
    x, p = _hard_blocks(c, rng)
    cols = np.arange(c.block)
    big = x.copy()  # quotients beyond float32's range (tiny scales, huge values): the float64 redo
    big[1:3] = np.float32(1e32)
    big[10:12, :5] = np.float32(-3e38)
    for v, cc in ((x, cols), (x[:, [0, 5, c.block - 1]], np.array([0, 5, c.block - 1])), (x * 3, cols),
                  (-x, cols), (big, cols)):
        with np.errstate(all="ignore"):
            want = Codec.encode(c, p, v, cc)
        got = c.encode(p, v, cc)
        assert got.dtype == want.dtype == np.int16
        np.testing.assert_array_equal(got, want)
    # the scales rows 7..39 were built to have ties: make sure ties were really exercised
    pt = p.take(slice(7, 40))
    err = np.abs(c.decode(pt, c.encode(pt, x[7:40], cols), cols).astype(np.float64) - x[7:40])
    assert (err == np.abs(pt.d.astype(np.float64))[:, None] / 2).mean() > 0.9


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("shape", [(1, 128), (3, 384), (37, 640), (130, 1152)])
def test_rtn_int_bytes_equal_the_candidate_search(name, shape):
    """The MatMulNBits bytes of rtn_int equal those built from the generic encoder's codes."""
    from edgeq.quant.codec_base import Codec

    fmt = parse_int_format(name)
    c = int_codec(fmt)
    w = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32) * np.float32(0.02)
    w[0, :fmt.group] = 0.0
    blocks = w.reshape(-1, fmt.group)
    p = c.fit(blocks)
    want = IntGroupTensor.from_blocks(fmt, shape, p, Codec.encode(c, p, blocks, np.arange(fmt.group)))
    got = rtn_int(w, fmt)
    for key, arr in want.to_matmulnbits().items():
        a = got.to_matmulnbits()[key]
        assert a.dtype == arr.dtype and a.shape == arr.shape
        assert a.tobytes() == arr.tobytes(), key

"""edgeq.quant.codecs: block codecs (fit / encode / decode / pack) checked against gguf-py."""
from __future__ import annotations

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.quant import FORMATS, QType, dequantize, quantize
from edgeq.quant.codecs import Params, codec_for, rtn_encode

LEGACY = [QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]
KQUANTS = [QType.Q4_K, QType.Q6_K]
CODEC_TYPES = LEGACY + KQUANTS
_ids = lambda q: q.value  # noqa: E731


@pytest.fixture(scope="module")
def gguf():
    import gguf

    return gguf


def _gguf_dequant(gguf, data: np.ndarray, qt: QType, shape) -> np.ndarray:
    out = gguf.quants.dequantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType[qt.value])
    return np.asarray(out, np.float32).reshape(shape)


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


def _data(seed: int = 0, rows: int = 48, cols: int = 512) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((rows, cols)).astype(np.float32)
    zeros = normal.copy()
    zb = zeros.reshape(-1, 32)
    zb[rng.random(zb.shape[0]) < 0.3] = 0.0
    const = normal.copy()
    cb = const.reshape(-1, 32)
    cb[::3] = rng.standard_normal((cb[::3].shape[0], 1)).astype(np.float32)
    heavy = (rng.standard_t(1.5, (rows, cols)) * 0.02).astype(np.float32)
    positive = np.abs(normal) + 0.5  # K-quant sub-blocks without negative values
    negative = -np.abs(normal) - 0.5
    return {
        "normal": normal,
        "scaled": (normal * 0.02).astype(np.float32),
        "zero_blocks": zeros,
        "constant_blocks": const,
        "heavy_tailed": heavy,
        "integers": rng.integers(-8, 9, (rows, cols)).astype(np.float32),
        "tiny": (normal * 1e-6).astype(np.float32),
        "positive": positive.astype(np.float32),
        "negative": negative.astype(np.float32),
    }


DATA = _data()


# --------------------------------------------------------------------------- table


def test_new_formats_match_gguf_py_table(gguf):
    want = {QType.Q5_0: (32, 22, 6), QType.Q5_1: (32, 24, 7), QType.Q4_K: (256, 144, 12), QType.Q6_K: (256, 210, 14)}
    for qt, (bs, ts, gid) in want.items():
        info = FORMATS[qt]
        assert (info.block_size, info.type_size, info.ggml_type_id) == (bs, ts, gid)
        gt = gguf.GGMLQuantizationType[qt.value]
        assert int(gt) == gid and gguf.GGML_QUANT_SIZES[gt] == (bs, ts)
    for qt in CODEC_TYPES:
        c = codec_for(qt)
        assert (c.block, c.type_size) == (FORMATS[qt].block_size, FORMATS[qt].type_size)
        assert c.qtype is qt and codec_for(qt.value.lower()) is c


# --------------------------------------------------------------------------- rtn / layout


@pytest.mark.parametrize("case", sorted(DATA))
@pytest.mark.parametrize("qt", LEGACY, ids=_ids)
def test_rtn_encode_equals_reference_quantize(qt, case):
    x = DATA[case]
    np.testing.assert_array_equal(rtn_encode(x, qt), quantize(x, qt))


@pytest.mark.parametrize("case", sorted(DATA))
@pytest.mark.parametrize("qt", CODEC_TYPES, ids=_ids)
def test_gguf_py_decodes_our_bytes_exactly(gguf, qt, case):
    x = DATA[case]
    data = rtn_encode(x, qt)
    assert data.shape == (x.shape[0], x.shape[1] // FORMATS[qt].block_size * FORMATS[qt].type_size)
    ours = dequantize(data, qt, x.shape)
    _same_bits(ours, _gguf_dequant(gguf, data, qt, x.shape))
    if qt in KQUANTS:  # against llama.cpp's own quantizer (an independent oracle), decoded by gguf-py
        from tests.quant.ggml_oracle import ggml_quantize

        theirs = _gguf_dequant(gguf, ggml_quantize(x, qt.value), qt, x.shape)
        err_ours, err_ggml = float(np.mean((ours - x) ** 2)), float(np.mean((theirs - x) ** 2))
        assert err_ours <= 1.05 * err_ggml + 1e-30, (err_ours, err_ggml)
    else:  # legacy types: the same bytes as llama.cpp
        from tests.quant.ggml_oracle import ggml_quantize

        np.testing.assert_array_equal(data.reshape(-1), ggml_quantize(x, qt.value).reshape(-1))
    # the codec's own decode of the unpacked blocks is the same
    c = codec_for(qt)
    p, q = c.unpack(data)
    _same_bits(c.decode(p, q, np.arange(c.block)).reshape(x.shape), ours)


@pytest.mark.parametrize("qt", CODEC_TYPES, ids=_ids)
def test_layout_on_random_bytes(gguf, qt):
    """Any bit pattern: our unpack + decode == gguf-py's dequantize, and pack(unpack(b)) == b."""
    c = codec_for(qt)
    rng = np.random.default_rng(11)
    b = rng.integers(0, 256, (64, c.type_size), dtype=np.uint8)
    # keep the fp16 scales finite and moderate (random exponent bits could give inf / nan)
    f16_at = {QType.Q4_1: (0, 2), QType.Q5_1: (0, 2), QType.Q4_K: (0, 2), QType.Q6_K: (208,)}.get(qt, (0,))
    for off in f16_at:
        v = (rng.standard_normal(64) * 0.1).astype("<f2")
        b[:, off:off + 2] = v.view(np.uint8).reshape(-1, 2)
    p, q = c.unpack(b)
    assert q.shape == (64, c.block) and q.dtype == np.int16
    assert q.min() >= (c.store_min if c.store_min is not None else c.qmin) and q.max() <= c.qmax
    np.testing.assert_array_equal(c.pack(p, q), b)
    _same_bits(c.decode(p, q, np.arange(c.block)), _gguf_dequant(gguf, b, qt, (64, c.block)))


def test_k_quant_layout_by_hand(gguf):
    """Q4_K: 6-bit scale/min packing and nibble order; Q6_K: ql/qh/scales order, d last."""
    c = codec_for(QType.Q4_K)
    sc = np.array([[1, 2, 3, 4, 33, 40, 50, 63]], np.uint8)
    mn = np.array([[5, 6, 7, 8, 17, 20, 48, 62]], np.uint8)
    q = (np.arange(256) % 16).astype(np.int16)[None]
    p = Params(d=np.array([0.5], np.float32), m=np.array([0.25], np.float32), sc=sc, mn=mn)
    b = c.pack(p, q)
    assert b.shape == (1, 144)
    assert bytes(b[0, :4]) == np.array([0.5, 0.25], "<f2").tobytes()
    assert b[0, 4] == 1 | ((33 >> 4) << 6) and b[0, 12] == (33 & 15) | ((17 & 15) << 4)
    assert b[0, 16] == 0 | (0 << 4) and b[0, 17] == 1 | (1 << 4)  # low = values 0.., high = 32..
    y = _gguf_dequant(gguf, b, QType.Q4_K, (256,))
    j = np.arange(256) // 32
    _same_bits(y, (np.float32(0.5) * sc[0, j].astype(np.float32)) * (np.arange(256) % 16).astype(np.float32)
               - np.float32(0.25) * mn[0, j].astype(np.float32))

    c6 = codec_for(QType.Q6_K)
    sc6 = np.arange(-8, 8, dtype=np.int8)[None] * 9
    q6 = (np.arange(256) * 7 % 64).astype(np.int16)[None]
    p6 = Params(d=np.array([0.125], np.float32), sc=sc6)
    b6 = c6.pack(p6, q6)
    assert b6.shape == (1, 210) and bytes(b6[0, 208:]) == np.array([0.125], "<f2").tobytes()
    assert bytes(b6[0, 192:208]) == sc6.tobytes()
    assert b6[0, 0] == (q6[0, 0] & 15) | ((q6[0, 64] & 15) << 4)
    assert b6[0, 128] == (q6[0, 0] >> 4) | ((q6[0, 32] >> 4) << 2) | ((q6[0, 64] >> 4) << 4) | ((q6[0, 96] >> 4) << 6)
    y6 = _gguf_dequant(gguf, b6, QType.Q6_K, (256,))
    want = (np.float32(0.125) * sc6[0, np.arange(256) // 16].astype(np.float32)) * (q6[0] - 32).astype(np.float32)
    _same_bits(y6, want)


@pytest.mark.parametrize("qt", CODEC_TYPES, ids=_ids)
def test_pack_unpack_round_trip(qt):
    c = codec_for(qt)
    x = DATA["normal"].reshape(-1, c.block)
    p, q = c.rtn(x)
    assert q.dtype == np.int16 and q.shape == x.shape and q.min() >= c.qmin and q.max() <= c.qmax
    p2, q2 = c.unpack(c.pack(p, q))
    np.testing.assert_array_equal(q2, q)
    for f in ("d", "m", "sc", "mn"):
        a, b = getattr(p, f), getattr(p2, f)
        assert (a is None) == (b is None), f
        if a is not None:  # same dtype and bits (keeps the sign of zero scales)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), f
    cols = np.arange(c.block)
    _same_bits(c.decode(p2, q2, cols), c.decode(p, q, cols))
    # decode at a column subset == the same columns of the full decode
    sub = np.array([0, 5, c.block - 1, 17])
    _same_bits(c.decode(p, q[:, sub], sub), c.decode(p, q, cols)[:, sub])
    assert len(p.take(slice(2, 5))) == 3


# --------------------------------------------------------------------------- encode


def _brute_force(c, p, x, cols):
    codes = np.arange(c.qmin, c.qmax + 1, dtype=np.int16)
    vals = np.stack([c.decode(p, np.full(x.shape, k, np.int16), cols) for k in codes], axis=-1)
    err = np.abs(vals.astype(np.float64) - x.astype(np.float64)[..., None])
    return codes[err.argmin(axis=-1)], err.min(axis=-1)


@pytest.mark.parametrize("qt", CODEC_TYPES, ids=_ids)
def test_encode_is_nearest(qt):
    c = codec_for(qt)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, c.block)).astype(np.float32)
    x[0] = 0.0
    p = c.fit(x)
    for cols in (np.arange(c.block), np.array([3]), rng.choice(c.block, 7, replace=False)):
        # values inside and (x 1.5) beyond the representable range, plus exact grid points
        for v in (x[:, cols], (x[:, cols] * 1.5).astype(np.float32), c.decode(p, c.encode(p, x[:, cols], cols), cols)):
            q = c.encode(p, v, cols)
            assert q.dtype == np.int16 and q.shape == v.shape
            want_q, want_e = _brute_force(c, p, v, cols)
            got_e = np.abs(c.decode(p, q, cols).astype(np.float64) - v.astype(np.float64))
            np.testing.assert_array_equal(got_e, want_e)
            np.testing.assert_array_equal(q[1:], want_q[1:])  # ties: lower code, except scale 0 rows
    with pytest.raises(EdgeqError):
        c.encode(p, x[:, :3], np.arange(4))
    with pytest.raises(EdgeqError):
        c.encode(p, x[:, :1], np.array([c.block]))


def test_legacy_rtn_codes_are_ggml_not_always_nearest():
    """ggml computes codes with 1/d of the unrounded fp32 scale: rtn keeps that, encode is nearest."""
    c = codec_for(QType.Q4_0)
    x = DATA["normal"].reshape(-1, 32)
    p, q = c.rtn(x)
    qn = c.encode(p, x, np.arange(32))
    assert (np.abs(q.astype(int) - qn) <= 1).all()
    cols = np.arange(32)
    e_rtn = ((c.decode(p, q, cols) - x) ** 2).sum()
    e_near = ((c.decode(p, qn, cols) - x) ** 2).sum()
    assert e_near <= e_rtn


# --------------------------------------------------------------------------- fit quality


def _mse(x, qt):
    return float(((dequantize(rtn_encode(x, qt), qt, x.shape) - x) ** 2).mean())


def test_k_quant_rtn_error_is_sane():
    x = np.random.default_rng(2).standard_normal((64, 1024)).astype(np.float32)
    e = {qt: _mse(x, qt) for qt in CODEC_TYPES}
    assert e[QType.Q4_K] < 0.85 * e[QType.Q4_0]
    assert e[QType.Q4_K] < e[QType.Q4_1]
    assert e[QType.Q6_K] < 0.5 * e[QType.Q5_1]
    assert e[QType.Q8_0] < e[QType.Q6_K]
    # roughly what a 4-bit / 6-bit grid gives on N(0, 1)
    assert 0.002 < e[QType.Q4_K] < 0.008 and 1e-4 < e[QType.Q6_K] < 6e-4


@pytest.mark.parametrize("qt", KQUANTS, ids=_ids)
def test_weighted_fit_reduces_weighted_error(qt):
    c = codec_for(qt)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, c.block)).astype(np.float32)
    w = rng.exponential(1.0, (256, c.block)) ** 3  # very uneven importance
    cols = np.arange(c.block)

    def werr(p):
        r = c.decode(p, c.encode(p, x, cols), cols).astype(np.float64) - x
        return (w * r * r).sum(axis=1)

    e_plain = werr(c.fit(x))
    e_w = werr(c.fit(x, w))
    assert e_w.sum() < 0.9 * e_plain.sum()
    assert (e_w < e_plain).mean() > 0.7
    # a (block,) weight broadcasts over rows
    p1 = c.fit(x[:4], w[0])
    p2 = c.fit(x[:4], np.broadcast_to(w[0], (4, c.block)))
    np.testing.assert_array_equal(p1.sc, p2.sc)
    with pytest.raises(EdgeqError, match="weight"):
        c.fit(x, w[:, :3])
    with pytest.raises(EdgeqError, match="non-negative"):
        c.fit(x[:1], -np.ones(c.block))


def test_k_quant_fit_params_in_range():
    x = DATA["heavy_tailed"].reshape(-1, 256)
    p4 = codec_for(QType.Q4_K).fit(x)
    assert p4.sc.dtype == np.uint8 and p4.sc.max() <= 63 and p4.mn.max() <= 63 and p4.sc.shape == (len(x), 8)
    assert (p4.d >= 0).all() and (p4.m >= 0).all()
    np.testing.assert_array_equal(p4.d, p4.d.astype(np.float16).astype(np.float32))
    p6 = codec_for(QType.Q6_K).fit(x)
    assert p6.sc.dtype == np.int8 and p6.sc.shape == (len(x), 16)
    np.testing.assert_array_equal(p6.d, p6.d.astype(np.float16).astype(np.float32))
    z = codec_for(QType.Q4_K).rtn(np.zeros((2, 256), np.float32))
    assert not codec_for(QType.Q4_K).decode(*z, np.arange(256)).any()


# --------------------------------------------------------------------------- errors


def test_codec_errors():
    with pytest.raises(EdgeqError, match="not a block-quantized type"):
        codec_for(QType.F16)
    with pytest.raises(EdgeqError, match="expected a quantization type"):
        codec_for("Q3_K")
    with pytest.raises(EdgeqError, match="multiple of 256, got 96"):
        rtn_encode(np.zeros((2, 96), np.float32), QType.Q6_K)
    with pytest.raises(EdgeqError, match="2-D"):
        rtn_encode(np.zeros(64, np.float32), QType.Q4_0)
    c = codec_for(QType.Q5_0)
    with pytest.raises(EdgeqError, match=r"\(R, 32\)"):
        c.fit(np.zeros((2, 16), np.float32))
    p, q = c.rtn(np.ones((2, 32), np.float32))
    with pytest.raises(EdgeqError, match="codes outside"):
        c.pack(p, q + 40)
    with pytest.raises(EdgeqError, match="multiple of 22 bytes"):
        c.unpack(np.zeros(23, np.uint8))

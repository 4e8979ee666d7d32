"""edgeq.quant.reference must be byte-for-byte what gguf-py and llama.cpp produce."""
from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.quant import FORMATS, QType, dequantize, quantize, roundtrip, row_nbytes, tensor_nbytes
from edgeq.quant.formats import GGML_EXACT

# 32-value block types, quantized bit-exactly like ggml (the K-quants are in test_codecs.py)
QUANT_TYPES = [QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]
ALL_TYPES = [QType.F32, QType.F16, *QUANT_TYPES]


def _load_tiny_gguf():
    name = "edgeq_tests_tiny_gguf"
    if name not in sys.modules:  # tests are not a package (--import-mode=importlib): load by path
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("tiny_gguf.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the file executes
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def gguf():
    import gguf

    return gguf


def _ggml_type(gguf, qt: QType):
    return gguf.GGMLQuantizationType[qt.value]


# --------------------------------------------------------------------------- data


def _tie_blocks(rng: np.random.Generator, n: int) -> np.ndarray:
    """Blocks whose scale is a power of two, so that x * id lands exactly on rounding ties.

    Q8_0: one element is +-127 * 2^k -> d = 2^k, other values are multiples of 2^k / 2.
    Q4_0: one element is +-8 * 2^k -> d = -+2^k, x * id + 8.5 hits integers / halves exactly.
    Q4_1: min = 0 or -7.5 * 2^k, max = min + 15 * 2^k -> d = 2^k.
    Q5_0: one element is +-16 * 2^k; Q5_1: min = 0, max = 31 * 2^k.
    """
    out = []
    for i in range(n):
        s = np.float32(2.0 ** rng.integers(-6, 4))
        kind = i % 6
        if kind == 0:  # Q8_0 ties
            b = rng.integers(-254, 254, 32) / 2.0
            b[rng.integers(32)] = rng.choice([-127.0, 127.0])
        elif kind == 1:  # Q4_0 ties
            b = rng.integers(-32, 33, 32) / 4.0
            b[rng.integers(32)] = rng.choice([-8.0, 8.0])
        elif kind == 2:  # Q4_1 ties, min 0, max 15
            b = rng.integers(0, 31, 32) / 2.0
            b[0], b[-1] = 0.0, 15.0
        elif kind == 3:  # Q4_1 ties, symmetric range
            b = rng.integers(-15, 16, 32) / 2.0
            b[3], b[7] = -7.5, 7.5
        elif kind == 4:  # Q5_0 ties
            b = rng.integers(-64, 65, 32) / 4.0
            b[rng.integers(32)] = rng.choice([-16.0, 16.0])
        else:  # Q5_1 ties, min 0, max 31
            b = rng.integers(0, 63, 32) / 2.0
            b[0], b[-1] = 0.0, 31.0
        out.append(b * s)
    return np.asarray(out, dtype=np.float32)


def _fp16_tie_blocks() -> np.ndarray:
    """Blocks whose fp32 scale d falls exactly halfway between two fp16 values (round-to-even)."""
    half_ulp = np.float32(2.0 ** -11)
    rows = []
    for m in (np.float32(1) + half_ulp, np.float32(1) + 3 * half_ulp, np.float32(3) + 6 * half_ulp):
        b = np.linspace(-1, 1, 32, dtype=np.float32)
        q8 = b.copy()
        q8[5] = 127 * m  # d = amax / 127 = m exactly
        q40 = b.copy()
        q40[9] = -8 * m  # d = max / -8 = m exactly
        q41 = b * 0 + 1
        q41[0], q41[1] = 0, 15 * m  # d = 15 m / 15 = m
        q50 = b.copy()
        q50[11] = -16 * m  # d = max / -16 = m
        q51 = b * 0 + 1
        q51[0], q51[1] = 0, 31 * m  # d = 31 m / 31 = m
        rows += [q8, q40, q41, q50, q51]
    return np.asarray(rows, dtype=np.float32)


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    n = 96  # rows of 256 = 8 blocks each
    normal = rng.standard_normal((n, 256)).astype(np.float32)

    heavy = (rng.standard_t(1.5, (n, 256)) * 0.02).astype(np.float32)
    heavy[rng.random((n, 256)) < 0.002] *= 1000  # rare big outliers

    zeros = rng.standard_normal((n, 256)).astype(np.float32)
    zb = zeros.reshape(-1, 32)
    zb[rng.random(zb.shape[0]) < 0.3] = 0.0
    zb[0, :16] = 0.0  # half-zero block

    const = rng.standard_normal((n, 256)).astype(np.float32)
    cb = const.reshape(-1, 32)
    sel = rng.random(cb.shape[0]) < 0.5
    cb[sel] = rng.standard_normal((int(sel.sum()), 1)).astype(np.float32)  # all-equal blocks
    cb[0] = 1.0
    cb[1] = -1.0
    cb[2] = 8.0
    cb[3] = -0.3

    tiny = np.concatenate([
        rng.standard_normal((n // 3, 256)) * 1e-6,   # fp16 scale is subnormal
        rng.standard_normal((n // 3, 256)) * 1e-12,  # fp16 scale underflows to 0
        rng.standard_normal((n // 3, 256)) * 1e-30,  # fp32 still normal, 1/d finite
    ]).astype(np.float32)

    ints = rng.integers(-8, 9, (n, 256)).astype(np.float32)  # many exact ties everywhere

    mixed_sign_max = rng.standard_normal((n, 256)).astype(np.float32)
    mb = mixed_sign_max.reshape(-1, 32)
    mb[::2, 0], mb[::2, 1] = -5.0, 5.0  # |max| tie, first (negative) one wins
    mb[1::2, 0], mb[1::2, 1] = 5.0, -5.0

    return {
        "normal": normal,
        "normal_scaled": (normal * 0.02).astype(np.float32),
        "heavy_tailed": heavy,
        "zero_blocks": zeros,
        "constant_blocks": const,
        "tiny": tiny,
        "ties": _tie_blocks(rng, 8 * n).reshape(n, 256),
        "fp16_scale_ties": _fp16_tie_blocks().reshape(-1, 96),
        "integers": ints,
        "abs_max_tie": mixed_sign_max,
        "large": (normal * 1e3).astype(np.float32),
    }


CASES = _cases()


# --------------------------------------------------------------------------- (a), (b) vs gguf-py


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.value)
def test_quantize_matches_gguf_py(gguf, qt, case):
    x = CASES[case]
    ours = quantize(x, qt)
    assert ours.dtype == np.uint8
    assert ours.shape == x.shape[:-1] + (row_nbytes(qt, x.shape[-1]),)
    ref = np.ascontiguousarray(gguf.quants.quantize(x, _ggml_type(gguf, qt))).view(np.uint8).reshape(ours.shape)
    mism = np.flatnonzero((ours != ref).any(axis=-1))
    assert mism.size == 0, f"{mism.size} rows differ, first row {mism[0]}"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda q: q.value)
def test_dequantize_matches_gguf_py(gguf, qt, case):
    x = CASES[case]
    data = quantize(x, qt)
    ours = dequantize(data, qt, x.shape)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    ref = np.asarray(gguf.quants.dequantize(data, _ggml_type(gguf, qt)), dtype=np.float32).reshape(x.shape)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    rt = roundtrip(x, qt)  # quantize + dequantize: within llama.cpp's own quantization error
    if qt in (QType.F32, QType.F16):
        np.testing.assert_array_equal(rt, x.astype(np.float16).astype(np.float32) if qt == QType.F16 else x)
    else:
        from tests.quant.ggml_oracle import ggml_quantize

        theirs = np.asarray(gguf.quants.dequantize(ggml_quantize(x, qt.value), _ggml_type(gguf, qt)),
                            dtype=np.float32).reshape(x.shape)
        assert float(np.mean((rt - x) ** 2)) <= 1.05 * float(np.mean((theirs - x) ** 2)) + 1e-30, qt


def test_table_matches_gguf_py(gguf):
    for qt, info in FORMATS.items():
        gt = _ggml_type(gguf, qt)
        assert int(gt) == info.ggml_type_id
        assert gguf.GGML_QUANT_SIZES[gt] == (info.block_size, info.type_size)
    assert FORMATS[QType.Q4_0].bits_per_weight == 4.5
    assert FORMATS[QType.Q4_1].bits_per_weight == 5.0
    assert FORMATS[QType.Q8_0].bits_per_weight == 8.5
    assert FORMATS[QType.Q5_0].bits_per_weight == 5.5
    assert FORMATS[QType.Q5_1].bits_per_weight == 6.0
    assert FORMATS[QType.Q4_K].bits_per_weight == 4.5
    assert FORMATS[QType.Q6_K].bits_per_weight == 6.5625


# --------------------------------------------------------------------------- ggml semantics by hand


def _f16(b: np.ndarray) -> float:
    return float(np.frombuffer(bytes(b[:2]), "<f2")[0])


def test_q8_0_known_block():
    x = np.zeros(32, np.float32)
    x[0], x[1], x[2], x[3], x[4] = 127.0, 0.5, -0.5, 2.5, -126.5  # d = 1, ties away from zero
    q = quantize(x, QType.Q8_0)
    assert q.shape == (34,)
    assert _f16(q) == 1.0
    assert list(q[2:7].view(np.int8)) == [127, 1, -1, 3, -127]
    assert not q[7:].any()


def test_q4_0_known_block():
    x = np.linspace(-1, 1, 32, dtype=np.float32)
    x[7] = -8.0  # signed max-abs -> d = -8 / -8 = 1
    x[0], x[1], x[16], x[17] = -0.5, 0.5, 6.5, 7.49  # +8.5 then truncate: 8, 9, 15, 15
    q = quantize(x, QType.Q4_0)
    assert q.shape == (18,) and _f16(q) == 1.0
    lo, hi = q[2:] & 0xF, q[2:] >> 4
    assert (lo[0], lo[1], hi[0], hi[1], lo[7]) == (8, 9, 15, 15, 0)
    x[7] = 8.0  # now d = -1: values flip
    q = quantize(x, QType.Q4_0)
    assert _f16(q) == -1.0 and (q[2 + 7] & 0xF) == 0  # 8 * -1 + 8.5 = 0.5 -> 0


def test_q4_1_known_block():
    x = np.full(32, 3.0, np.float32)
    x[0], x[1], x[2], x[3] = 0.0, 15.0, 7.5, 7.49  # d = 1, m = 0; +0.5 then truncate
    q = quantize(x, QType.Q4_1)
    assert q.shape == (20,) and _f16(q) == 1.0 and _f16(q[2:]) == 0.0
    lo = q[4:] & 0xF
    assert list(lo[:4]) == [0, 15, 8, 7]


def test_q5_known_blocks():
    x = np.linspace(-1, 1, 32, dtype=np.float32)
    x[3] = -16.0  # d = -16 / -16 = 1: q = trunc(x + 16.5)
    x[0], x[16], x[17], x[31] = 0.0, 15.49, -15.5, 7.0  # codes 16, 31, 1, 23
    q = quantize(x, QType.Q5_0)
    assert q.shape == (22,) and _f16(q) == 1.0
    qh = int.from_bytes(bytes(q[2:6]), "little")
    codes = [((q[6 + j % 16] >> (4 * (j // 16))) & 0xF) | (((qh >> j) & 1) << 4) for j in range(32)]
    assert (codes[0], codes[3], codes[16], codes[17], codes[31]) == (16, 0, 31, 1, 23)
    np.testing.assert_array_equal(dequantize(q, QType.Q5_0, (32,)), np.asarray(codes, np.float32) - 16)
    # Q5_1: d = (31 - 0) / 31 = 1, m = 0; element j's 5th bit in qh bit j (j + 16 for the high half)
    y = np.zeros(32, np.float32)
    y[1], y[18], y[5], y[20] = 31.0, 16.0, 15.49, 15.5
    q = quantize(y, QType.Q5_1)
    assert q.shape == (24,) and _f16(q) == 1.0 and _f16(q[2:]) == 0.0
    assert int.from_bytes(bytes(q[4:8]), "little") == (1 << 1) | (1 << 18) | (1 << 20)
    assert (q[8 + 1] & 0xF, q[8 + 2] >> 4, q[8 + 5] & 0xF, q[8 + 4] >> 4) == (15, 0, 15, 0)
    for qt in (QType.Q5_0, QType.Q5_1):  # all-zero blocks
        z = quantize(np.zeros(32, np.float32), qt)
        assert not dequantize(z, qt, (32,)).any()
    z = quantize(np.zeros(32, np.float32), QType.Q5_0)  # d = -0.0, every code 16: qh all ones
    assert bytes(z[:2]) == b"\x00\x80" and bytes(z[2:6]) == b"\xff" * 4 and not z[6:].any()


def test_zero_and_constant_blocks_like_ggml():
    pz = np.zeros(32, np.float32)
    nz = -pz
    # Q4_0: ggml starts from max = +0.0, so d = +0.0 / -8 = -0.0 whatever the zeros' signs.
    for z in (pz, nz):
        q = quantize(z, QType.Q4_0)
        assert bytes(q[:2]) == b"\x00\x80" and (q[2:] == 0x88).all()
    # Q8_0: amax = +0.0 -> d = +0.0, quants 0.
    for z in (pz, nz):
        q = quantize(z, QType.Q8_0)
        assert not q.any()
    # Q4_1: the first zero decides min (and max); d = max - min = +0.0.
    mixed = pz.copy()
    mixed[0] = -0.0
    q = quantize(mixed, QType.Q4_1)
    assert bytes(q[:4]) == b"\x00\x00\x00\x80" and not q[4:].any()
    mixed2 = nz.copy()
    mixed2[0] = 0.0
    q = quantize(mixed2, QType.Q4_1)
    assert bytes(q[:4]) == b"\x00\x00\x00\x00" and not q[4:].any()
    # all-equal non-zero block: Q4_1 stores it exactly in m; Q4_0/Q8_0 at full scale.
    c = np.full(32, -0.3, np.float32)
    for qt in QUANT_TYPES:
        np.testing.assert_allclose(roundtrip(c, qt), c, rtol=1e-3)
    q = quantize(c, QType.Q4_0)
    assert (q[2:] == 0).all()  # -0.3 * (1 / (-0.3 / -8)) + 8.5 = 0.5 -> 0


@pytest.mark.parametrize("qt", QUANT_TYPES, ids=lambda q: q.value)
def test_shapes_and_error_bound(qt):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    q = quantize(x, qt)
    assert q.shape == (3, 5, row_nbytes(qt, 64))
    assert q.nbytes == tensor_nbytes(qt, x.shape)
    np.testing.assert_array_equal(q.reshape(15, -1), quantize(x.reshape(15, 64), qt))
    np.testing.assert_array_equal(quantize(x[0, 0], qt), q[0, 0])
    y = dequantize(q, qt, x.shape)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    # max error in units of amax: half a step, except Q4_0 whose top code (+8) is clipped to +7
    bound = {QType.Q8_0: 0.5 / 127, QType.Q4_0: 1 / 8, QType.Q4_1: 1 / 15, QType.Q5_0: 1 / 16,
             QType.Q5_1: 1 / 31}[qt]
    err = np.abs((y - x).reshape(-1, 32))
    assert (err <= amax * bound * 1.01 + 2e-3 * amax).all()
    assert dequantize(q.reshape(-1), qt, x.shape).shape == x.shape  # flat bytes accepted


def test_float_formats():
    x = np.array([[1.0, -2.5, 65504.0, 1e-8]], np.float32)
    assert quantize(x, QType.F32).tobytes() == x.astype("<f4").tobytes()
    f16 = quantize(x, "f16")
    assert f16.shape == (1, 8) and f16.tobytes() == x.astype("<f2").tobytes()
    np.testing.assert_array_equal(dequantize(f16, QType.F16, x.shape), x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(dequantize(quantize(x, "F32"), "F32", x.shape), x)
    assert quantize(np.ones(3, np.float64), QType.F32).shape == (12,)  # any column count


# --------------------------------------------------------------------------- (d) errors


def test_bad_column_count():
    with pytest.raises(EdgeqError, match=r"expected .*multiple of 32, got 33"):
        quantize(np.zeros((2, 33), np.float32), QType.Q4_0)
    for qt in QUANT_TYPES:
        with pytest.raises(EdgeqError, match="got 48"):
            row_nbytes(qt, 48)
        with pytest.raises(EdgeqError, match="got 40"):
            tensor_nbytes(qt, (4, 40))
        with pytest.raises(EdgeqError):
            dequantize(np.zeros(10, np.uint8), qt, (2, 20))
    assert row_nbytes(QType.Q4_0, 64) == 36 and row_nbytes("Q4_1", 64) == 40 and row_nbytes("q8_0", 64) == 68
    assert tensor_nbytes(QType.F16, (3, 7)) == 42
    with pytest.raises(EdgeqError, match="expected 36 bytes, got 35"):
        dequantize(np.zeros(35, np.uint8), QType.Q4_0, (64,))
    with pytest.raises(EdgeqError, match="expected a quantization type"):
        quantize(np.zeros(32, np.float32), "Q5_K")


# --------------------------------------------------------------------------- (c) vs llama.cpp


def _plant_edge_cases(tensors: dict[str, np.ndarray]) -> None:
    """Overwrite rows of some weights with edge-case blocks (ggml semantics, not gguf-py's)."""
    w = tensors["blk.0.ffn_up.weight"]  # (128, 64): 2 blocks per row
    b = w.reshape(-1, 32)
    special = [
        np.zeros(32), -np.zeros(32),                            # all +0 / all -0
        np.where(np.arange(32) % 2, 0.0, -0.0),                 # -0 first, then +0
        np.where(np.arange(32) % 2, -0.0, 0.0),                 # +0 first, then -0
        np.full(32, 0.25), np.full(32, -1.5),                   # constant blocks
        np.r_[np.zeros(31), -1e-3], np.r_[1e-3, np.zeros(31)],  # single non-zero
    ]
    special += list(_tie_blocks(np.random.default_rng(3), 64))
    special += list(_fp16_tie_blocks())
    special += list(np.random.default_rng(4).standard_normal((16, 32)) * 1e-30)
    special += list(np.random.default_rng(5).integers(-8, 9, (16, 32)))
    b[: len(special)] = np.asarray(special, np.float32)
    h = tensors["blk.1.ffn_down.weight"]  # (64, 128)
    h[:] = (np.random.default_rng(6).standard_t(1.5, h.shape) * 0.02).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory, gguf):
    tg = _load_tiny_gguf()
    path = tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf"
    tensors = tg.write_tiny_llama_gguf(path, edit=_plant_edge_cases)
    return path, tensors


_FTYPES = {QType.Q8_0: "LLAMA_FTYPE_MOSTLY_Q8_0", QType.Q4_0: "LLAMA_FTYPE_MOSTLY_Q4_0",
           QType.Q4_1: "LLAMA_FTYPE_MOSTLY_Q4_1", QType.Q5_0: "LLAMA_FTYPE_MOSTLY_Q5_0",
           QType.Q5_1: "LLAMA_FTYPE_MOSTLY_Q5_1"}


@pytest.mark.parametrize("qt", QUANT_TYPES, ids=lambda q: q.value)
def test_bit_exact_with_llama_cpp_quantize(tiny_f32, tmp_path, gguf, qt):
    import llama_cpp
    src_path, src = tiny_f32
    out_path = tmp_path / f"tiny-{qt.value}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[qt])
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src_path).encode(), str(out_path).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize returned {rc}"

    reader = gguf.GGUFReader(str(out_path))
    by_id = {info.ggml_type_id: q for q, info in FORMATS.items() if q in GGML_EXACT}
    written_types, at_requested = {}, []
    for t in reader.tensors:
        written = by_id.get(int(t.tensor_type))
        written_types[t.name] = written.value if written else gguf.GGMLQuantizationType(int(t.tensor_type)).name
        if written is None:
            continue  # e.g. a K-quant picked for output.weight: not bytes we reproduce
        x = src[t.name]
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        want = quantize(x, written).reshape(-1)
        assert got.size == want.size == tensor_nbytes(written, x.shape), t.name
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (
            f"{t.name} ({written.value}): {bad.size} bytes differ, first at byte {bad[0]} "
            f"(block {bad[0] // FORMATS[written].type_size})")
        if written is qt:
            at_requested.append(t.name)

    assert set(written_types) == set(src)
    blk_2d = {n for n, a in src.items() if n.startswith("blk.") and a.ndim == 2}
    assert blk_2d <= set(at_requested), f"not quantized to {qt.value}: {sorted(blk_2d - set(at_requested))}"
    assert {"blk.0.ffn_up.weight", "blk.1.ffn_down.weight"} <= set(at_requested)  # planted edge cases
    # 1-D norms stay F32 whatever the ftype (compared above, trivially equal)
    assert all(written_types[n] == "F32" for n, a in src.items() if a.ndim == 1)


def test_quantized_tiny_model_loads_in_llama_cpp(tiny_f32, tmp_path):
    """The tiny GGUF is a real model: llama.cpp loads the quantized file, tokenizes and evaluates."""
    import llama_cpp
    src_path, _ = tiny_f32
    out_path = tmp_path / "tiny-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src_path).encode(), str(out_path).encode(), ctypes.byref(params)) == 0
    model = llama_cpp.Llama(model_path=str(out_path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    try:
        toks = model.tokenize(b"hi there\n")
        assert toks[0] == 1 and toks[-1] == 3 + 0x0A  # BOS, newline via the <0x0A> byte token
        model.eval(toks)
        logits = np.asarray(model.scores[len(toks) - 1])
        assert logits.shape == (model.n_vocab(),) and np.isfinite(logits).all()
    finally:
        model.close()

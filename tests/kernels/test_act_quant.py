"""The int8-activation oracle (edgeq/kernels/act_quant.py) and the integer-dot weight layout
(edgeq/kernels/layout.py) against direct computations."""
import numpy as np

from edgeq.kernels import act_quant, layout
from edgeq.kernels.spec import KernelSpec


def test_quantize_activations():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 96)).astype(np.float32) * 3
    x[1, 32:64] = 0  # an all-zero group: codes 0, scale 0
    xq, dx = act_quant.quantize_activations(x, 32)
    assert xq.dtype == np.int8 and dx.shape == (2, 3)
    assert np.abs(xq.astype(int)).max() == 127 and dx[1, 1] == 0 and not xq[1, 32:64].any()
    for m in range(2):
        for g in range(3):
            seg = x[m, g * 32:(g + 1) * 32].astype(np.float64)
            amax = np.abs(seg).max()
            assert np.isclose(dx[m, g], amax / 127, rtol=1e-6)
            if amax:
                assert np.abs(xq[m, g * 32:(g + 1) * 32] * (amax / 127) - seg).max() <= amax / 127 / 2 * (1 + 1e-5)
    assert act_quant.quantize_activations(np.array([[127, 2.5, -2.5, 3.5] * 8], np.float32), 32)[0][0, :4].tolist() \
        == [127, 2, -2, 4]  # ties to even


def test_dot_layout_round_trips_and_puts_4_codes_of_a_lane_together():
    rng = np.random.default_rng(1)
    for bits in (4, 8):
        spec = KernelSpec(bits=bits, block=16, act="int8")
        codes = rng.integers(0, 1 << bits, (64, 128)).astype(np.uint8)
        packed = layout.pack_weight(codes, np.ones((64, 4), np.float32), None, spec)
        assert packed["qw"].shape == (4, 128 * bits // 32, 64)
        np.testing.assert_array_equal(layout.unpack_codes(packed["qw"], spec), codes)
        n, c = 21, 3  # output 21 = block 1, lane 5; word 3
        word = packed["qw"][1, c, 5 * 4:5 * 4 + 4]
        if bits == 8:
            np.testing.assert_array_equal(word, codes[n, 4 * c:4 * c + 4])
        else:
            np.testing.assert_array_equal(word & 15, codes[n, 8 * c:8 * c + 4])
            np.testing.assert_array_equal(word >> 4, codes[n, 8 * c + 4:8 * c + 8])


def test_integer_sums_and_reference_against_loops():
    rng = np.random.default_rng(2)
    spec = KernelSpec(bits=4, symmetric=False, block=8, act="int8")
    codes = rng.integers(0, 16, (16, 64)).astype(np.uint8)
    sc = rng.random((16, 2)).astype(np.float32)
    zp = rng.integers(0, 16, (16, 2)).astype(np.float32)
    arrays = layout.pack_weight(codes, sc, zp, spec)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    xq, dx = act_quant.quantize_activations(x, 32)
    sums = act_quant.integer_sums(spec, arrays, xq, 16)
    y = act_quant.reference(spec, arrays, x)
    for m in range(2):
        for n in range(16):
            want = 0.0
            for g in range(2):
                s = sum(int(xq[m, k]) * int(codes[n, k]) for k in range(g * 32, g * 32 + 32))
                assert sums[m, n, g] == s
                xs = sum(int(xq[m, k]) for k in range(g * 32, g * 32 + 32))
                want += float(dx[m, g]) * float(sc[n, g]) * (s - float(zp[n, g]) * xs)
            assert np.isclose(y[m, n], want, rtol=1e-9, atol=1e-9)

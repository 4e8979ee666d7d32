"""Activation rounding noise for the planner (edgeq/quant/act_noise.py): the rounding is ggml's own
(quantize_row_q8_0_ref / quantize_row_q8_K_ref from llama-cpp-python's libggml-base, called through
ctypes), the per-channel model predicts the measured output error of a rounded input, calibration
accumulates the noise of the linears' real inputs, and the planner adds it to each option by its
dot type (K-quants pay the 256-block rounding)."""
import ctypes
import functools
from pathlib import Path

import numpy as np
import pytest

from edgeq.quant import act_noise


@functools.lru_cache(maxsize=1)
def _ggml():
    import llama_cpp

    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))


def _ggml_round_trip(x: np.ndarray, codec: str) -> np.ndarray:
    """ggml's reference quantizer of the dot type, then its blocks decoded (d * q)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if codec == "q8_0":
        dt = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
        fn = _ggml().quantize_row_q8_0_ref
    else:
        dt = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16)])
        fn = _ggml().quantize_row_q8_K_ref
    out = np.zeros(x.size // act_noise.BLOCK[codec], dt)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return (out["d"].astype(np.float32)[:, None] * out["qs"].astype(np.float32)).reshape(-1)


def _outlier_rows(rng, T=16, n=512):
    x = rng.standard_normal((T, n)).astype(np.float32)
    x[:, 7] *= 40  # an outlier channel, as in attention / GLU outputs
    x[:, n * 300 // 512] *= -25
    x[3, 64:96] = 0  # an all-zero q8_0 block
    return x


@pytest.mark.parametrize("codec", ["q8_0", "q8_k"])
def test_rounding_is_ggmls_reference_quantizer(codec):
    x = _outlier_rows(np.random.default_rng(0))
    got = act_noise.rounded(x, codec)
    want = np.stack([_ggml_round_trip(row, codec) for row in x])
    np.testing.assert_array_equal(got, want)


def test_f16_rounding_and_block_widths():
    x = _outlier_rows(np.random.default_rng(1), n=96)
    np.testing.assert_array_equal(act_noise.rounded(x, "f16"), x.astype(np.float16).astype(np.float32))
    sums = act_noise.noise_sums(x)
    assert set(sums) == {"q8_0", "f16"}  # 96 columns: no 256-blocks
    assert set(act_noise.noise_sums(_outlier_rows(np.random.default_rng(1)))) == {"q8_0", "q8_k", "f16"}


def test_the_per_channel_model_predicts_the_output_error():
    """E‖W δ‖² over the rows vs Σ_j ‖w_j‖² E[δ_j²]: within a few % (rounding errors nearly uncorrelated)."""
    rng = np.random.default_rng(2)
    x = _outlier_rows(rng, T=256)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    for codec in ("q8_0", "q8_k"):
        d = (act_noise.rounded(x, codec) - x).astype(np.float64)
        measured = float(np.mean(np.sum((d @ w.T.astype(np.float64)) ** 2, axis=1)))
        noise = act_noise.noise_sums(x)[codec] / len(x)
        predicted = act_noise.activation_error(w, noise)
        assert abs(predicted / measured - 1) < 0.05, (codec, predicted, measured)
    # the outliers make the 256-blocks far coarser than the 32-blocks
    sums = act_noise.noise_sums(x)
    assert sums["q8_k"].sum() > 3 * sums["q8_0"].sum()


def test_dot_types_follow_llama_cpp():
    cpu = {t: act_noise.dot_codec(t) for t in ("Q4_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K", "F16", "F32")}
    assert cpu == {"Q4_0": "q8_0", "Q5_1": "q8_0", "Q8_0": "q8_0", "Q4_K": "q8_k", "Q6_K": "q8_k", "F16": "f16",
                   "F32": None}
    assert act_noise.dot_codec("Q4_K", "llama-cuda") == "q8_0"  # MMQ: q8_1 blocks of 32 for every type
    assert act_noise.dot_codec("Q4_K", "none") is None


@pytest.fixture(scope="module")
def calibrated(tiny_llama):
    from edgeq.calibrate import alpaca_token_sequences, calibrate
    from edgeq.frontend import load_model

    ir = load_model(tiny_llama)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=4, seq_len=32)
    return ir, seqs, calibrate(ir, seqs, progress=False)


def test_calibration_accumulates_the_noise_of_the_real_inputs(calibrated):
    from activation_taps import tapped

    ir, seqs, stats = calibrated
    taps = tapped(ir, seqs, names=("attn_in", "down_in"))
    for li, layer in enumerate(stats.layers):
        for tap, inp in (("attn_in", "attn"), ("down_in", "down")):
            x = np.asarray(taps[li][tap], dtype=np.float32)
            want = act_noise.noise_sums(x)
            for codec, v in want.items():
                np.testing.assert_allclose(layer.act_noise[f"{inp}.{codec}"], v / len(x), rtol=1e-9, atol=0)


def test_planner_adds_each_options_activation_error(calibrated):
    from edgeq.ir import Role
    from edgeq.plan import Choice, measure_options

    ir, _, stats = calibrated
    types = ["Q4_0", "Q8_0", "F16"]
    plain = measure_options(ir, stats, types, [0], probe=None, progress=False, tables=False, activations="none")
    cpu = measure_options(ir, stats, types, [0], probe=None, progress=False, tables=False)
    name = "blk.1.ffn_down"
    lin = ir.linears[name]
    assert lin.role == Role.DOWN
    for t, codec in (("Q4_0", "q8_0"), ("Q8_0", "q8_0"), ("F16", "f16")):
        a = {o.choice: o.kl for o in plain[name]}[Choice(t, 0)]
        b = {o.choice: o.kl for o in cpu[name]}[Choice(t, 0)]
        extra = act_noise.activation_error(lin.weight, stats.layers[1].act_noise[f"down.{codec}"])
        assert extra > 0
        assert b == pytest.approx(a + extra, rel=1e-9)

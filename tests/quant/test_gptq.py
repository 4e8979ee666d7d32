"""GPTQ on the target grids: lossless packing, and lower layer output error than RTN."""
import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.ir import Role
from edgeq.quant.codecs import codec_for
from edgeq.quant.gptq import GPTQConfig, gptq, output_error, pack_gguf, rtn
from edgeq.quant.reference import dequantize, quantize

GRID_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
ROLES = (Role.Q, Role.K, Role.V, Role.O, Role.GATE, Role.UP, Role.DOWN)


def _linears(ir, stats):
    for lin in ir.linears.values():
        yield lin.name, lin.weight, stats.layers[lin.layer].input_cov(lin.role)


@pytest.mark.parametrize("qtype", GRID_TYPES)
def test_gptq_beats_rtn_on_every_tiny_linear(tiny_calibrated, qtype):
    ir, stats, _ = tiny_calibrated
    codec = codec_for(qtype)
    total_rtn = total_gptq = 0.0
    for name, w, cov in _linears(ir, stats):
        e_rtn = output_error(w - rtn(w, codec).dequant, cov)
        e_gptq = output_error(w - gptq(w, cov, codec).dequant, cov)
        assert e_gptq <= e_rtn * 1.0001, (name, e_gptq, e_rtn)
        total_rtn += e_rtn
        total_gptq += e_gptq
    assert total_gptq < 0.95 * total_rtn, (total_gptq, total_rtn)


def test_act_order_also_beats_rtn(tiny_calibrated):
    ir, stats, _ = tiny_calibrated
    codec = codec_for("Q4_0")
    tot = {"rtn": 0.0, "act": 0.0}
    for _, w, cov in _linears(ir, stats):
        tot["rtn"] += output_error(w - rtn(w, codec).dequant, cov)
        tot["act"] += output_error(w - gptq(w, cov, codec, GPTQConfig(act_order=True)).dequant, cov)
    assert tot["act"] < tot["rtn"]


@pytest.mark.parametrize("qtype", GRID_TYPES + ["Q4_K", "Q6_K"])
def test_packing_is_lossless(qtype):
    """The packed bytes decode (ggml's dequantization) to exactly GPTQ's dequantized values."""
    rng = np.random.default_rng(0)
    K = 512
    x = rng.standard_normal((2048, K)) * np.exp(rng.standard_normal(K))
    cov = x.T @ x / len(x)
    w = (rng.standard_normal((48, K)) * 0.05).astype(np.float32)
    codec = codec_for(qtype)
    for res in (gptq(w, cov, codec), rtn(w, codec)):
        data = pack_gguf(res, codec)
        assert data.dtype == np.uint8
        np.testing.assert_array_equal(dequantize(data, qtype, w.shape), res.dequant)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_rtn_equals_llama_cpp_reference_quantizer(qtype):
    """Unweighted RTN through the codec = ggml's quantize_row_*_ref, byte for byte."""
    w = (np.random.default_rng(1).standard_normal((16, 256)) * 0.1).astype(np.float32)
    codec = codec_for(qtype)
    np.testing.assert_array_equal(pack_gguf(rtn(w, codec), codec), quantize(w, qtype))


def test_gptq_rows_are_independent(tiny_calibrated):
    """Permuting rows permutes the codes (GGUF permutes Q/K rows after quantization)."""
    ir, stats, _ = tiny_calibrated
    lin = ir.linear(0, Role.Q)
    cov = stats.layers[0].input_cov(Role.Q)
    codec = codec_for("Q4_0")
    perm = np.random.default_rng(0).permutation(lin.out_features)
    a = pack_gguf(gptq(lin.weight, cov, codec), codec)
    b = pack_gguf(gptq(lin.weight[perm], cov, codec), codec)
    np.testing.assert_array_equal(a[perm], b)


def test_errors():
    codec = codec_for("Q4_0")
    with pytest.raises(EdgeqError, match="multiple of 32"):
        gptq(np.zeros((4, 40), np.float32), np.eye(40), codec)
    with pytest.raises(EdgeqError, match="covariance"):
        gptq(np.zeros((4, 64), np.float32), np.eye(32), codec)
    with pytest.raises(EdgeqError, match="non-finite"):
        gptq(np.full((4, 64), np.nan, np.float32), np.eye(64), codec)


def test_dead_inputs_keep_a_grid_aligned_weight_exact():
    """Columns whose input never fires (zero variance, e.g. behind a norm weight of exactly 0)
    keep their weights: a weight already on the grid (a dequantized GGUF, as Gemma 3 270M's
    checkpoint) comes back exactly, dead column included; nothing is non-finite. Off the grid, GPTQ
    spreads no other column's error into a dead column: it is its own nearest code."""
    rng = np.random.default_rng(0)
    for qtype in ("Q8_0", "Q5_0"):
        codec = codec_for(qtype)
        w = rtn(rng.standard_normal((8, 64)).astype(np.float32), codec).dequant  # on the grid
        x = rng.standard_normal((512, 64))
        x[:, 5] = 0.0
        res = gptq(w, x.T @ x / 512, codec)
        assert np.all(np.isfinite(res.dequant))
        np.testing.assert_array_equal(res.dequant, w)
        off = rng.standard_normal((8, 64)).astype(np.float32)  # off the grid: the GPTQ path
        res = gptq(off, x.T @ x / 512, codec)
        assert np.all(np.isfinite(res.dequant))
        near = codec.decode(res.params[0], codec.encode(res.params[0], off[:, 5:6], np.array([5])), np.array([5]))
        np.testing.assert_array_equal(res.dequant[:, 5:6], near)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0", "Q6_K"])
def test_rows_already_on_the_grid_keep_their_codes(qtype):
    """A dequantized GGUF's rows come back exactly (RTN's codes and block parameters: GPTQ would fit
    its block parameters on error-updated weights and leave the grid); the other rows get GPTQ,
    as if they were quantized alone; the packed bytes are RTN's on the grid rows."""
    rng = np.random.default_rng(3)
    codec = codec_for(qtype)
    K = 256
    x = rng.standard_normal((1024, K)) * (1 + rng.random(K))
    cov = x.T @ x / len(x)
    w = rtn((rng.standard_normal((12, K)) * 0.05).astype(np.float32), codec).dequant
    assert np.array_equal(rtn(w, codec, np.diag(cov)).dequant, w), "the fixture must lie on the weighted grid"
    off = [2, 7]
    w[off] += (rng.standard_normal((2, K)) * 0.01).astype(np.float32)
    res = gptq(w, cov, codec)
    grid = [r for r in range(12) if r not in off]
    np.testing.assert_array_equal(res.dequant[grid], w[grid])
    alone = gptq(w[off], cov, codec)
    np.testing.assert_array_equal(res.dequant[off], alone.dequant)
    packed = pack_gguf(res, codec)
    np.testing.assert_array_equal(packed[grid], pack_gguf(rtn(w, codec, np.diag(cov)), codec)[grid])
    np.testing.assert_array_equal(packed[off], pack_gguf(alone, codec))
    # the GPTQ rows still beat round-to-nearest on the output error they minimise
    e_gptq = output_error(w[off] - alone.dequant, cov)
    e_rtn = output_error(w[off] - rtn(w[off], codec, np.diag(cov)).dequant, cov)
    assert e_gptq < e_rtn


@pytest.mark.parametrize("fmt", ["int4_g32_sym", "int4_g32_asym", "int8_g64_sym"])
def test_gptq_on_the_int_group_format(tiny_calibrated, fmt):
    """GPTQ emits MatMulNBits-ready int-group tensors too: exact round trip, lower error than RTN."""
    from edgeq.quant.gptq import to_int_group
    from edgeq.quant.intgroup import int_codec

    ir, stats, _ = tiny_calibrated
    codec = int_codec(fmt)
    e_rtn = e_gptq = 0.0
    for name, w, cov in _linears(ir, stats):
        res = gptq(w, cov, codec)
        t = to_int_group(res, codec)
        np.testing.assert_array_equal(t.dequantize(), res.dequant)
        e_gptq += output_error(w - res.dequant, cov)
        e_rtn += output_error(w - rtn(w, codec).dequant, cov)
    assert e_gptq < e_rtn


@pytest.mark.parametrize("K", [32, 300, 1024])
def test_inverse_hessian_factor_is_the_cholesky_factor_of_the_inverse(K):
    # oracle: scipy's Cholesky of numpy's explicit inverse (the textbook construction)
    import scipy.linalg

    from edgeq.quant.gptq import _inverse_cholesky

    rng = np.random.default_rng(K)
    X = rng.standard_normal((3 * K, K)) * np.exp(rng.standard_normal(K))  # anisotropic columns
    H = X.T @ X / len(X)
    H += 0.01 * np.mean(np.diag(H)) * np.eye(K)
    U = _inverse_cholesky(H)
    assert np.array_equal(U, np.triu(U)) and np.all(np.diag(U) > 0)
    oracle = scipy.linalg.cholesky(np.linalg.inv(H), lower=False)
    assert np.abs(U - oracle).max() <= 1e-9 * np.abs(oracle).max()
    assert np.abs(U.T @ U @ H - np.eye(K)).max() < 1e-9


def test_a_hessian_that_is_not_positive_definite_is_one_clear_error():
    from edgeq.quant.gptq import _inverse_cholesky

    H = np.eye(64)
    H[10, 10] = -1.0
    with pytest.raises(EdgeqError, match="not positive definite"):
        _inverse_cholesky(H)

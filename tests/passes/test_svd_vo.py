"""svd_vo: whitened SVD of V per KV group (exact at rate 0); all three UniQL sorts together."""
import numpy as np
import pytest

from edgeq.calibrate import alpaca_token_sequences, calibrate
from edgeq.frontend import load_adapter, load_model
from edgeq.ir import Role
from edgeq.passes import run_pass
from edgeq.passes.svd_vo import SVDVOConfig, sqrt_psd
from edgeq.passes.uniql import UniQLSortConfig
from edgeq.tolerances import SORT_EXACT_MAX_REL

SVD_DIAG_MAX_OFF = 1e-6  # off-diagonal of the whitened Gram of the new V rows, relative to its max


@pytest.mark.parametrize("fold", [True, False])
def test_exact_at_rate_zero(model, fold, rel_err):
    ir, stats = model
    out = run_pass(ir, SVDVOConfig(fold_v_bias=fold), stats)
    assert rel_err(ir, out) <= SORT_EXACT_MAX_REL
    assert [r.name for r in out.history] == ["svd_vo"]
    out.validate()
    v, o = out.linear(0, Role.V), out.linear(0, Role.O)
    if ir.linear(0, Role.V).bias is None:  # llama: nothing to fold
        assert v.bias is None and o.bias is None
    elif fold:  # qwen2: the V bias became a constant o_proj bias
        assert v.bias is None and o.bias is not None and np.abs(o.bias).max() > 0
    else:
        assert v.bias is not None and o.bias is None


def test_components_sorted_by_singular_value(model):
    ir, stats = model
    hp = ir.hparams
    D = hp.head_dim
    out = run_pass(ir, SVDVOConfig(), stats)
    for i in range(hp.num_layers):
        C_half = sqrt_psd(stats.layers[i].attn_xx, SVDVOConfig().damp)
        for g in range(hp.num_kv_heads):
            w_new = out.linear(i, Role.V).weight[g * D:(g + 1) * D].astype(np.float64)
            w_old = ir.linear(i, Role.V).weight[g * D:(g + 1) * D].astype(np.float64)
            assert not np.allclose(w_new, w_old)
            # whitened rows are orthogonal with descending norms = singular values of C^1/2 W^T
            gram = (C_half @ w_new.T).T @ (C_half @ w_new.T)
            off = gram - np.diag(np.diag(gram))
            assert np.abs(off).max() <= SVD_DIAG_MAX_OFF * gram.max()
            sv = np.sqrt(np.diag(gram))
            assert np.all(np.diff(sv) <= 1e-9 * sv[0])
            np.testing.assert_allclose(sv, np.linalg.svd(C_half @ w_old.T, compute_uv=False), rtol=1e-5)
            # the change of basis is orthogonal: W_new = R W_old with R^T R = I
            R = w_new @ np.linalg.pinv(w_old)
            np.testing.assert_allclose(R @ R.T, np.eye(D), atol=1e-4)


def test_lora_branches_are_rotated_consistently(tiny_qwen2, tiny_qwen2_lora, rel_err, calibrate_tiny):
    ir = load_adapter(load_model(tiny_qwen2), tiny_qwen2_lora)
    out = run_pass(ir, SVDVOConfig(), calibrate_tiny(ir))
    assert out.linear(0, Role.V).low_rank and out.linear(0, Role.O).low_rank
    assert rel_err(ir, out) <= SORT_EXACT_MAX_REL


# ---- all three sorts ---------------------------------------------------------------------------

def test_uniql_all_three_exact(model, rel_err):
    ir, stats = model
    out = run_pass(ir, UniQLSortConfig(), stats)
    assert [r.name for r in out.history] == ["sort_mlp", "sort_qk", "svd_vo"]
    assert rel_err(ir, out) <= SORT_EXACT_MAX_REL
    for name, lin in ir.linears.items():
        if lin.role in (Role.K, Role.Q, Role.V, Role.GATE):
            assert not np.array_equal(out.linears[name].weight, lin.weight), name


def test_uniql_with_lora_exact(tiny_llama, tiny_llama_lora, rel_err, calibrate_tiny):
    ir = load_adapter(load_model(tiny_llama), tiny_llama_lora)
    out = run_pass(ir, UniQLSortConfig(), calibrate_tiny(ir))
    assert rel_err(ir, out) <= SORT_EXACT_MAX_REL


@pytest.mark.slow
def test_smollm2_uniql_exact(smollm2_dir, rel_err):
    ir = load_model(smollm2_dir)
    stats = calibrate(ir, alpaca_token_sequences(ir.tokenizer, n_samples=8, seq_len=128), progress=False)
    assert stats.n_samples == 8 and all(L.n_tokens == 8 * 128 for L in stats.layers)
    out = run_pass(ir, UniQLSortConfig(), stats)
    assert len(out.rope_index) == ir.hparams.num_layers
    assert rel_err(ir, out, n=24) <= SORT_EXACT_MAX_REL


def test_layers_rotated_on_several_threads_give_the_same_model(model, monkeypatch):
    import threading
    import time

    import edgeq.passes.svd_vo as sv
    from edgeq.streaming import allow_layer_workers

    ir, stats = model
    seq = run_pass(ir, SVDVOConfig(), stats)
    threads, real = set(), sv.sqrt_psd
    monkeypatch.setattr(sv, "sqrt_psd", lambda *a: (threads.add(threading.get_ident()), time.sleep(0.05), real(*a))[2])
    with allow_layer_workers(2):
        par = run_pass(ir, SVDVOConfig(), stats)
    assert threading.get_ident() not in threads and len(threads) == 2
    for name, lin in seq.linears.items():
        assert np.array_equal(lin.weight, par.linears[name].weight), name
        assert (lin.bias is None) == (par.linears[name].bias is None)
        assert lin.bias is None or np.array_equal(lin.bias, par.linears[name].bias), name
